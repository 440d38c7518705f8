"""Checks shared by the stochastic-sampler tests (sddim, ersde): exact Gaussian moments and
per-sample noise keyed by the global index (batch-size invariance)."""

import jax
import jax.numpy as jnp
import numpy as np

MU, S = np.array([0.3, -1.0]), np.array([0.5, 1.5])  # data N(MU, diag(S^2))


def exact_marginal(schedule, t, mu=MU, s=S):
    """Mean and per-coordinate variance of x_t for data N(mu, diag(s^2))."""
    a, sig = float(schedule.alpha(np.float64(t))), float(schedule.sigma(np.float64(t)))
    return a * mu, a**2 * s**2 + sig**2


def assert_moments_match(schedule, sampler, seed: int, n: int = 4096):
    """Start from the exact marginal at ts[0]; mean, variances and covariance at ts[-1] must
    match the exact ones within 5 Monte-Carlo standard errors."""
    mean_T, var_T = exact_marginal(schedule, sampler.ts[0])
    z = jax.random.normal(jax.random.key(seed), (n, 2), jnp.float64)
    x = np.asarray(jax.jit(sampler)(mean_T + np.sqrt(var_T) * z, jax.random.key(seed + 1)))
    mean_0, var_0 = exact_marginal(schedule, sampler.ts[-1])
    cov = np.cov(x.T)
    assert np.all(np.abs(x.mean(0) - mean_0) < 5 * np.sqrt(var_0 / n))
    assert np.all(np.abs(np.diag(cov) / var_0 - 1) < 5 * np.sqrt(2 / n))
    assert abs(cov[0, 1]) < 5 * np.sqrt(var_0[0] * var_0[1] / n)


def assert_batch_size_invariant(sampler, seed: int):
    """Batches of 1, 7 and 64 (with index_offset) give the same per-sample results."""
    x_T = jax.random.normal(jax.random.key(seed), (64, 2), jnp.float64)
    key = jax.random.key(seed + 1)
    run = jax.jit(sampler)
    full = np.asarray(run(x_T, key))
    for size in (1, 7):
        parts = [np.asarray(run(x_T[i : i + size], key, i)) for i in range(0, 64, size)]
        np.testing.assert_allclose(np.concatenate(parts), full, rtol=1e-12, atol=1e-12)
