"""The one model interface: turn any network into ``eps_fn(x, t) -> eps``.

Samplers only ever see ``eps_fn(x, t)``, where ``t`` is continuous SDE time (a scalar) and
``x`` has a leading batch axis; the training loss calls the same function with one time per
example and a key for the network's own randomness, ``eps_fn(x, t, key)``. Everything
model-specific is converted here, in one place:

* what the network predicts -- with ``x = alpha x0 + sigma eps`` and ``v = alpha eps - sigma x0``:

  ======== =========================================
  eps      ``eps``
  score    ``eps = -sigma * score``
  x0       ``eps = (x - alpha x0) / sigma``
  v        ``eps = (sigma x + alpha v) / (alpha^2 + sigma^2)``
  ======== =========================================

* what the network is conditioned on -- ``schedule.model_time(t)`` by default (``999 t`` for
  score_sde's continuous VP/sub-VP models, ``sigma(t)`` for VE, the step index for discrete
  DDPM schedules), broadcast to shape ``(batch,)``; pass ``time_input`` to override.
* classifier-free guidance, ``eps = eps_uncond + w (eps_cond - eps_uncond)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from deis_jax.sampling.sde import NoiseSchedule

PREDICTIONS = ("eps", "score", "x0", "v")

# eps_fn(x, t) -> eps: x of shape (B, ...), t continuous SDE time (a scalar or shape (B,)).
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def output_to_eps(
    out: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array, prediction: str
) -> jax.Array:
    """Convert a network output of kind ``prediction`` at ``(alpha, sigma)`` into eps."""
    if prediction == "eps":
        return out
    if prediction == "score":
        return -sigma * out
    if prediction == "x0":
        return (x - alpha * out) / sigma
    if prediction == "v":
        return (sigma * x + alpha * out) / (alpha**2 + sigma**2)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def model_argument(fn: Callable) -> jax.tree_util.Partial:
    """``fn`` as a pytree, so that it can be an argument of a jitted function.

    A ``jax.tree_util.Partial`` is returned as it is (its bound arguments -- the network
    parameters -- are the pytree's leaves, hence arguments of the compiled function, never
    constants baked into it); any other callable is wrapped with no leaves.
    """
    return fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn)


@dataclasses.dataclass(frozen=True)
class ModelOutputToEps:
    """``(model_fn, x, t, key=None) -> eps``: the conversion of :func:`eps_fn_from_model`.

    A value object (equal settings compare equal), so two eps functions built from the same
    schedule and prediction share one compiled sampler whatever their parameters."""

    schedule: NoiseSchedule
    prediction: str
    time_input: Callable[[jax.Array], jax.Array] | None = None

    def __call__(self, model_fn, x, t, key=None):
        t = jnp.asarray(t)  # a scalar, or one time per example (shape (B,))
        to_cond = self.schedule.model_time if self.time_input is None else self.time_input
        cond = jnp.broadcast_to(to_cond(t), x.shape[:1]).astype(x.dtype)
        out = model_fn(x, cond) if key is None else model_fn(x, cond, key)
        per_example = (-1,) + (1,) * (x.ndim - 1) if t.ndim == 1 else ()
        alpha = self.schedule.alpha(t).astype(x.dtype).reshape(per_example)
        sigma = self.schedule.sigma(t).astype(x.dtype).reshape(per_example)
        return output_to_eps(out, x, alpha, sigma, self.prediction)


def eps_fn_from_model(
    model_fn: Callable[..., jax.Array],
    schedule: NoiseSchedule,
    prediction: str = "eps",
    time_input: Callable[[jax.Array], jax.Array] | None = None,
) -> EpsFn:
    """Wrap ``model_fn(x, cond)`` (``cond`` of shape ``(batch,)``) as ``eps_fn(x, t)``.

    ``t`` is a scalar or one time per example (shape ``(batch,)``). The returned function also
    takes an optional ``key``: ``eps_fn(x, t, key)`` calls ``model_fn(x, cond, key)`` (the
    network's dropout during training); without a key ``model_fn`` gets two arguments.

    The result is a ``jax.tree_util.Partial`` whose leaves are those of ``model_fn``: give a
    ``Partial(apply, params)`` and ``jax.jit(sample, static_argnums=0)(plan, eps_fn, x_T)``
    takes the parameters as arguments (see :func:`model_argument`).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    convert = ModelOutputToEps(schedule, prediction, time_input)
    return jax.tree_util.Partial(convert, model_argument(model_fn))


def guided_eps_fn(eps_cond: EpsFn, eps_uncond: EpsFn, guidance_scale: float) -> EpsFn:
    """Classifier-free guidance: ``eps_u + w (eps_c - eps_u)`` (w = 1 is the conditional)."""

    def eps_fn(x, t):
        e_u = eps_uncond(x, t)
        return e_u + guidance_scale * (eps_cond(x, t) - e_u)

    return eps_fn
