"""The one model interface: turn any network into ``eps_fn(x, t) -> eps``.

**The contract.** Samplers call ``eps_fn(x, t)`` with ``x`` of shape ``(B, ...)`` and ``t``
continuous SDE time, *a scalar*; ``eps`` has ``x``'s shape. Every method, AMED's per-sample
intermediate times included, keeps to it: where a step needs one time per sample
(``t`` of shape ``(B,)``), :func:`call_per_sample` calls a model that *declares* it accepts
such times once for the batch, and any other model once per sample (``jax.vmap`` over the
rows, each call with a scalar ``t``). A model declares it by being built with
:func:`eps_fn_from_model` (the networks of ``deis_jax.models``), or with
:func:`per_sample_time` (the exact mixtures of ``deis_jax.evaluation.analytic``). A declared
model that fails on per-sample times is reported as such. The training loss calls the same
function with one time per example and a key for the network's own randomness,
``eps_fn(x, t, key)`` (a network's own forward pass, always per example).

**Class labels.** A class-conditional model takes the classes of the batch's rows as one more
argument, ``eps_fn(x, t, labels=labels)`` (int, shape ``(B,)``: row ``i`` is drawn for class
``labels[i]``), the way it takes ``x``: they are per-row data of the call, never bound into
the function. Whoever changes the rows changes the labels with them -- the sampler tiles them
for its one call on the ``K B`` concatenated probes of a parallel step and slices them in
:func:`call_per_sample`; a fitter indexes them with its minibatches. :func:`eps_of` makes the
call (``labels=None``: the unconditional call ``eps_fn(x, t)``, exactly). An eps function of
:func:`eps_fn_from_model` forwards them as ``model_fn(x, cond, labels=labels)``.

Everything model-specific is converted here, in one place:

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

Bottleneck features (for the AMED sampler, whose tiny predictor reads the network's
lowest-resolution activation): :func:`eps_with_features` ``(eps_fn, x, t) -> (eps, features)``
calls ``eps_fn(x, t, features=True)``, which an eps function of :func:`eps_fn_from_model`
forwards as ``model_fn(x, cond, features=True)``; such a ``model_fn`` must then return
``(out, features)`` -- ``features`` of shape ``(B, F)``, for the networks of
:mod:`deis_jax.models` the channel mean of the bottleneck activation, ``(B, H_low * W_low)``,
float32 and under ``stop_gradient`` (``deis_jax.models.features.apply_with_features``). The
eps functions of ``deis_jax.models.loading.load_model`` do this; :func:`supports_features`
says whether an eps function can (without calling it). Plain functions -- an exact mixture's
eps, a guided eps, a ``model_fn`` without the ``features`` keyword -- cannot:
:func:`eps_with_features` raises a ``ValueError`` for them, and a sampler should fall back to
a feature-free predictor.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

from deis_jax.sampling.sde import NoiseSchedule

PREDICTIONS = ("eps", "score", "x0", "v")

# eps_fn(x, t) -> eps: x of shape (B, ...), t continuous SDE time (a scalar; shape (B,) only
# for an eps_fn that declares it, see accepts_per_sample_time).
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]

_NO_FEATURES = (
    "eps_with_features needs a network that returns its bottleneck feature: build eps_fn "
    "with eps_fn_from_model around a model_fn(x, cond, *, features=False) that returns "
    "(out, features) when features=True -- e.g. LoadedModel.eps_fn() of a model from "
    "deis_jax.models.loading.load_model -- or use the feature-free predictor"
)


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
    """``(model_fn, x, t, key=None, *, features=False) -> eps``: the conversion of
    :func:`eps_fn_from_model`; with ``features=True`` it calls
    ``model_fn(x, cond[, key], features=True)``, which must return ``(out, features)``, and
    returns ``(eps, features)``.

    A value object (equal settings compare equal), so two eps functions built from the same
    schedule and prediction share one compiled sampler whatever their parameters."""

    schedule: NoiseSchedule
    prediction: str
    time_input: Callable[[jax.Array], jax.Array] | None = None

    def __call__(self, model_fn, x, t, key=None, *, features: bool = False, labels=None):
        t = jnp.asarray(t)  # a scalar, or one time per example (shape (B,))
        to_cond = self.schedule.model_time if self.time_input is None else self.time_input
        cond = jnp.broadcast_to(to_cond(t), x.shape[:1]).astype(x.dtype)
        args = (x, cond) if key is None else (x, cond, key)
        if labels is not None:  # the rows' classes (a class-conditional model_fn)
            model_fn = functools.partial(model_fn, labels=labels)
        if features:
            result = model_fn(*args, features=True)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise ValueError(
                    f"model_fn(x, cond, features=True) must return (out, features), got "
                    f"{type(result).__name__}; {_NO_FEATURES}"
                )
            out, feats = result
        else:
            out = model_fn(*args)
        per_example = (-1,) + (1,) * (x.ndim - 1) if t.ndim == 1 else ()
        alpha = self.schedule.alpha(t).astype(x.dtype).reshape(per_example)
        sigma = self.schedule.sigma(t).astype(x.dtype).reshape(per_example)
        eps = output_to_eps(out, x, alpha, sigma, self.prediction)
        return (eps, feats) if features else eps


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

    ``eps_fn(x, t, features=True)`` calls ``model_fn(x, cond, features=True)`` and returns
    ``(eps, features)`` (see :func:`eps_with_features`); only a ``model_fn`` that takes that
    keyword and returns ``(out, features)`` supports it. ``eps_fn(x, t, labels=labels)``
    calls ``model_fn(x, cond, labels=labels)`` (a class-conditional network; the module
    docstring).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    convert = ModelOutputToEps(schedule, prediction, time_input)
    return jax.tree_util.Partial(convert, model_argument(model_fn))


def per_sample_time(eps_fn: EpsFn) -> EpsFn:
    """``eps_fn`` declared to accept one time per sample, ``t`` of shape ``(B,)`` (row ``i`` at
    time ``t[i]``), as well as a scalar: :func:`call_per_sample` then calls it once for the
    batch instead of once per row. Declare only what is true: a model written for a scalar
    ``t`` may broadcast a ``(B,)`` time against the wrong axis without an error.

    A ``jax.tree_util.Partial`` stays one (its leaves, e.g. network parameters, stay
    arguments of a jitted sampler)."""
    if isinstance(eps_fn, jax.tree_util.Partial):
        return jax.tree_util.Partial(per_sample_time(eps_fn.func), *eps_fn.args,
                                     **eps_fn.keywords)  # fmt: skip

    @functools.wraps(eps_fn)
    def declared(*args, **kwargs):
        return eps_fn(*args, **kwargs)

    declared.per_sample_time = True
    return declared


def accepts_per_sample_time(eps_fn: EpsFn) -> bool:
    """Whether ``eps_fn`` declares it takes ``t`` of shape ``(B,)``: built by
    :func:`eps_fn_from_model` or marked by :func:`per_sample_time` (an attribute
    ``per_sample_time = True``). Decided from the function's structure, without calling it."""
    fn = eps_fn
    while isinstance(fn, jax.tree_util.Partial | functools.partial):
        if isinstance(fn.func, ModelOutputToEps):
            return True
        fn = fn.func
    return bool(getattr(fn, "per_sample_time", False))


def eps_of(eps_fn: EpsFn, x: jax.Array, t: jax.Array, labels: jax.Array | None = None):
    """``eps_fn(x, t)``, or for rows with class ``labels`` (int ``(B,)``; a class-conditional
    model) ``eps_fn(x, t, labels=labels)`` (the module docstring)."""
    return eps_fn(x, t) if labels is None else eps_fn(x, t, labels=labels)


def call_per_sample(
    eps_fn: EpsFn,
    x: jax.Array,
    t: jax.Array,
    check: Callable[[jax.Array, jax.Array], jax.Array],
    labels: jax.Array | None = None,
) -> jax.Array:
    """``eps`` of row ``i`` of ``x`` (of class ``labels[i]``, when given) at time ``t[i]``
    (``t`` of shape ``(B,)``), each output passed through ``check(eps, x)`` (the sampler's
    shape/dtype check).

    A model that declares per-sample times (:func:`accepts_per_sample_time`) is called once;
    any other once per row under ``jax.vmap``, with a batch of one and a scalar time, as the
    contract promises it (and that row's label)."""
    if not accepts_per_sample_time(eps_fn):
        if labels is None:
            return jax.vmap(lambda xi, ti: check(eps_fn(xi[None], ti), xi[None])[0])(x, t)
        return jax.vmap(
            lambda xi, ti, li: check(eps_of(eps_fn, xi[None], ti, li[None]), xi[None])[0]
        )(x, t, labels)
    try:
        eps = eps_of(eps_fn, x, t, labels)
    except Exception as err:
        raise TypeError(
            f"eps_fn declares that it takes one time per sample (it is built by "
            f"eps_fn_from_model or marked per_sample_time), but failed with t of shape "
            f"{t.shape} for x of shape {x.shape}: {type(err).__name__}: {err}. A model that "
            "takes a scalar t only must not be declared: deis_jax then calls it per sample"
        ) from err
    return check(eps, x)


def guided_eps_fn(eps_cond: EpsFn, eps_uncond: EpsFn, guidance_scale: float) -> EpsFn:
    """Classifier-free guidance: ``eps_u + w (eps_c - eps_u)`` (w = 1 is the conditional)."""

    def eps_fn(x, t):
        e_u = eps_uncond(x, t)
        return e_u + guidance_scale * (eps_cond(x, t) - e_u)

    return eps_fn


def _takes_features_keyword(fn: Callable) -> bool:
    """Whether ``fn`` accepts a ``features`` keyword, by its signature (True when unknown:
    :func:`eps_with_features` then finds out at trace time)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind is p.VAR_KEYWORD
        or (p.name == "features" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in params
    )


def supports_features(eps_fn: Callable) -> bool:
    """Whether ``eps_fn`` can return the network's bottleneck feature (see
    :func:`eps_with_features`): an eps function of :func:`eps_fn_from_model` around a
    ``model_fn`` that takes a ``features`` keyword (e.g. ``LoadedModel.eps_fn()`` of
    ``deis_jax.models.loading.load_model``). Decided from the function's structure, without
    calling the network."""
    if not (
        isinstance(eps_fn, jax.tree_util.Partial)
        and isinstance(eps_fn.func, ModelOutputToEps)
        and len(eps_fn.args) == 1
        and not eps_fn.keywords
    ):
        return False
    return _takes_features_keyword(eps_fn.args[0])


def eps_with_features(
    eps_fn: EpsFn, x: jax.Array, t: jax.Array, labels: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(eps, features)`` from one network call: ``eps_fn(x, t, features=True)`` (with the
    rows' class ``labels`` when given, as :func:`eps_of`).

    ``eps`` equals ``eps_fn(x, t)``; ``features`` is what the network returns alongside, for
    the networks of :mod:`deis_jax.models` the channel mean of the bottleneck activation,
    shape ``(B, H_low * W_low)``, float32, under ``stop_gradient``.

    Raises:
      ValueError: if ``eps_fn`` cannot return features (:func:`supports_features` is False, or
        its ``model_fn`` rejects the ``features`` keyword when traced): a plain function such
        as an exact mixture's eps, a guided eps, or a ``model_fn`` without the keyword.
    """
    if not supports_features(eps_fn):
        raise ValueError(f"{_NO_FEATURES} (got {_describe(eps_fn)})")
    try:
        if labels is None:
            return eps_fn(x, t, features=True)
        return eps_fn(x, t, features=True, labels=labels)
    except TypeError as err:
        if "features" not in str(err):
            raise
        raise ValueError(f"{_NO_FEATURES} (model_fn: {err})") from err


def _describe(fn: Callable) -> str:
    """A short name for ``fn`` in error messages."""
    around = isinstance(fn, jax.tree_util.Partial) and isinstance(fn.func, ModelOutputToEps)
    inner = fn.args[0] if around and fn.args else fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    name = getattr(inner, "__qualname__", type(inner).__name__)
    return f"an eps_fn_from_model around {name}" if around else name
