"""Denoising score matching (score_sde's continuous-time loss), for every schedule at once.

For data ``x0``, ``t ~ U(eps, T)`` per example, ``z ~ N(0, I)`` and
``x_t = alpha(t) x0 + sigma(t) z``, score_sde minimises

    || s(x_t, t) sigma(t) + z ||^2                                  (default)
    || s(x_t, t) + z / sigma(t) ||^2 g(t)^2                         (likelihood weighting)

with the score ``s = -eps / sigma``. In the eps form used here (whatever the network predicts
is converted to eps by ``deis_jax.sampling.wrappers.eps_fn_from_model``, the samplers' model
interface) these are

    || eps(x_t, t) - z ||^2        and        || eps(x_t, t) - z ||^2 g(t)^2 / sigma(t)^2,

reduced over pixels by the mean (``reduce_mean=True``) or by half the sum (score_sde's
``reduce_mean=False``), then averaged over the batch. Nothing is per-SDE: the network is
conditioned on ``schedule.model_time(t)`` (999 t for VP / sub-VP, sigma(t) for VE) and the
diffusion coefficient needed for likelihood weighting is derived from the marginals,
``g^2 = d sigma^2/dt - 2 (d log alpha/dt) sigma^2`` (beta for VP, beta (1 - e^{-2 int beta})
for sub-VP, d sigma^2/dt for VE -- score_sde's SDEs). ``T`` is ``schedule.default_t1``.
score_sde trains every continuous SDE with ``eps = 1e-5``. A discrete schedule draws integer
``t`` uniformly from ``{0, ..., N - 1}`` (DDPM's loss).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from deis_jax.sampling.sde import NoiseSchedule

# eps_model(x_t, t, key) -> eps, with x_t (B, ...) and t (B,) continuous SDE times: what
# ``deis_jax.sampling.wrappers.eps_fn_from_model`` returns, called with a dropout key.
EpsModel = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def _per_example(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape a (B,) vector to broadcast against a (B, ...) batch."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def diffusion_squared(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """``g(t)^2`` of the forward SDE with the schedule's marginals (elementwise in ``t``)."""

    def log_alpha_and_var(s):
        sig = schedule.sigma(s)
        return schedule.log_alpha(s), sig * sig

    t = jnp.asarray(t, jnp.result_type(float))
    (_, var), (dlog_alpha, dvar) = jax.jvp(log_alpha_and_var, (t,), (jnp.ones_like(t),))
    return dvar - 2.0 * dlog_alpha * var


def sample_times(schedule: NoiseSchedule, key: jax.Array, n: int, eps: float) -> jax.Array:
    """Training times: ``U(eps, T)`` (continuous) or uniform integers (discrete)."""
    if schedule.is_discrete:
        return jax.random.randint(key, (n,), 0, int(schedule.t_max) + 1).astype(jnp.float32)
    return jax.random.uniform(key, (n,), minval=eps, maxval=schedule.default_t1)


def dsm_loss(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    eps: float = 1e-5,
    reduce_mean: bool = True,
    likelihood_weighting: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """score_sde's denoising score matching loss: ``(batch mean, per-example losses)``.

    ``key`` is split into the time, the noise and the model's own randomness (dropout).
    """
    k_t, k_z, k_model = jax.random.split(key, 3)
    t = sample_times(schedule, k_t, x0.shape[0], eps)
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    alpha = _per_example(schedule.alpha(t), x0).astype(x0.dtype)
    sigma = _per_example(schedule.sigma(t), x0).astype(x0.dtype)
    x_t = alpha * x0 + sigma * z
    sq = jnp.square(eps_model(x_t, t, k_model) - z).reshape(x0.shape[0], -1)
    losses = jnp.mean(sq, axis=-1) if reduce_mean else 0.5 * jnp.sum(sq, axis=-1)
    if likelihood_weighting:
        if schedule.is_discrete:
            raise ValueError("likelihood weighting needs a continuous-time schedule")
        losses = losses * diffusion_squared(schedule, t) / jnp.square(schedule.sigma(t))
    return jnp.mean(losses), losses
