"""Stochastic DDIM (``sddim``) and the exact output law of the stochastic step tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stochastic_checks import (
    MU,
    S,
    assert_batch_size_invariant,
    assert_moments_match,
    exact_marginal,
)

import deis_jax as deis
from deis_jax.evaluation.analytic import GaussianMixture
from deis_jax.sampling.solvers import get_method
from deis_jax.sampling.solvers.stochastic import sddim_coefficients

jax.config.update("jax_enable_x64", True)

VP = deis.VPSDE.linear()
DISCRETE = deis.DiscreteVPSDE.linear()


def gaussian_eps_fn(schedule, mu=MU, s=S):
    """Exact eps for data N(mu, diag(s^2)) (``deis_jax.evaluation.analytic``)."""
    return GaussianMixture.gaussian(mu, s).eps_fn(schedule)


# --- lambda = 0 / lambda = 1 ---------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [VP, DISCRETE], ids=["vp", "discrete"])
def test_lambda_zero_is_ddim(schedule):
    ts = deis.time_grid(schedule, 9, "quadratic")
    sd = get_method("sddim").build(schedule, ts, 0, lam=0.0)
    ddim = get_method("ddim").build(schedule, ts, 0)
    for a, b in zip(sd, ddim, strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise the DDIM table
    eta0 = get_method("sddim").build(schedule, ts, 0, eta=0.0)
    for a, b in zip(eta0, ddim, strict=True):
        np.testing.assert_array_equal(a, b)
    sampler = deis.get_sampler(schedule, gaussian_eps_fn(schedule), ts, method="sddim", lam=0.0)
    assert not sampler.stochastic and sampler.nfe == 9


@pytest.mark.parametrize("schedule", [VP, DISCRETE], ids=["vp", "discrete"])
def test_lambda_one_is_ddpm_posterior(schedule):
    ts = deis.time_grid(schedule, 12, "quadratic")
    psi, c, noise = sddim_coefficients(schedule, ts, lam=1.0)
    abar = np.asarray(schedule.alpha(ts), np.float64) ** 2
    a_t, a_s = abar[:-1], abar[1:]
    np.testing.assert_allclose(noise**2, (1 - a_s) / (1 - a_t) * (1 - a_t / a_s), rtol=1e-12)
    # mean: x_s = psi x_t + c eps, eps = (x_t - sqrt(a_t) x0)/sqrt(1 - a_t)
    coef_xt = psi + c / np.sqrt(1 - a_t)
    coef_x0 = -c * np.sqrt(a_t) / np.sqrt(1 - a_t)
    np.testing.assert_allclose(coef_xt, np.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t), rtol=1e-12)
    np.testing.assert_allclose(coef_x0, np.sqrt(a_s) * (1 - a_t / a_s) / (1 - a_t), rtol=1e-12)
    # eta = 1 is the same sampler
    _, c_eta, noise_eta = sddim_coefficients(schedule, ts, eta=1.0)
    np.testing.assert_allclose(c_eta, c, rtol=1e-12)
    np.testing.assert_allclose(noise_eta, noise, rtol=1e-12)


def test_lambda_variance_formula_and_eta_mapping():
    ts = deis.time_grid(VP, 15, "quadratic")
    rho, sigma = VP.rho(ts), VP.sigma(ts)
    ratio = rho[1:] / rho[:-1]
    for lam in (0.3, 0.7, 1.5, 2.0):
        _, c, noise = sddim_coefficients(VP, ts, lam=lam)
        var = sigma[1:] ** 2 * (1 - ratio ** (2 * lam**2))
        np.testing.assert_allclose(noise**2, var, rtol=1e-10)
        # mean coefficient on eps keeps the marginal variance: sqrt(sigma_s^2 - var)
        alpha_next = VP.alpha(ts[1:])
        np.testing.assert_allclose(c + alpha_next * rho[:-1], np.sqrt(sigma[1:] ** 2 - var))
        # the exact per-step eta of this lambda reproduces the variance
        eta_k = np.sqrt(np.expm1(2 * lam**2 * np.log(ratio)) / np.expm1(2 * np.log(ratio)))
        for k in (0, 7, 14):
            _, c_eta, noise_eta = sddim_coefficients(VP, ts[k : k + 2], eta=float(eta_k[k]))
            np.testing.assert_allclose(noise_eta[0], noise[k], rtol=1e-10)
            np.testing.assert_allclose(c_eta[0], c[k], rtol=1e-10)


def test_small_lambda_noise_has_no_cancellation():
    ts = deis.time_grid(VP, 10, "quadratic")
    _, _, noise = sddim_coefficients(VP, ts, lam=1e-6)
    sigma, ratio = VP.sigma(ts[1:]), VP.rho(ts[1:]) / VP.rho(ts[:-1])
    # 1 - r^(2 lam^2) ~ -2 lam^2 log r: a naive 1 - r**(2 lam**2) loses all digits here
    np.testing.assert_allclose(noise**2, sigma**2 * -2e-12 * np.log(ratio), rtol=1e-6)


def test_invalid_options():
    ts = deis.time_grid(VP, 5, "quadratic")
    build = get_method("sddim").build
    with pytest.raises(ValueError, match="not both"):
        build(VP, ts, 0, lam=0.5, eta=0.5)
    with pytest.raises(ValueError, match="lam"):
        build(VP, ts, 0, lam=-1.0)
    with pytest.raises(ValueError, match="eta"):
        build(VP, ts, 0, eta=float("nan"))
    with pytest.raises(ValueError, match="smaller eta"):
        build(VP, ts, 0, eta=3.0)


# --- the exact law of a stochastic table on Gaussian data ------------------------------------


def output_law(table, schedule, mu, s):
    """Mean and variance of the table's output for 1-D Gaussian data N(mu, s^2).

    eps is affine in x, so the output is affine in (x_T, z_0, ..., z_{N-1}): track the
    coefficients exactly (x_T drawn from the exact marginal at t_1).
    """
    n = table.num_steps
    t_start = table.t[0, 0]
    mean_T, var_T = exact_marginal(schedule, t_start, mu, s)
    x = np.zeros(n + 2)  # [constant, x_T noise, z_0, ..., z_{N-1}]
    x[0], x[1] = mean_T, np.sqrt(var_T)
    hist = [np.zeros_like(x)] * table.history
    for k in range(n):
        t = table.t[k, 0]
        a, rho = float(schedule.alpha(t)), float(schedule.rho(t))
        eps = rho * x / a / (s**2 + rho**2)
        eps[0] -= rho * mu / (s**2 + rho**2)
        out = table.pred_x[k, 0] * x + table.pred_eps[k, 0] * eps
        new = table.out_x[k] * x + table.out_k[k, 0] * out
        for j in range(table.history):
            new = new + table.out_hist[k, j] * hist[j]
        new[2 + k] += table.out_noise[k]
        hist = ([out] + hist[:-1]) if table.history else hist
        x = new
    return x[0], float(np.sum(x[1:] ** 2))


@pytest.mark.parametrize(
    "method,order,options,tol",
    [
        ("sddim", 0, {"lam": 0.5}, 0.03),
        ("sddim", 0, {"lam": 1.0}, 0.05),
        ("sddim", 0, {"eta": 1.0}, 0.05),
        ("ersde", 1, {}, 0.03),
        ("ersde", 2, {"phi": "sde_2"}, 2e-3),
        ("ersde", 3, {}, 2e-3),
        ("ersde", 3, {"phi": "sde", "order3": "corrected"}, 2e-3),
        ("ersde", 3, {"phi": "sde_1"}, 2e-3),
        ("ersde", 3, {"phi": "sde_4", "quadrature": "riemann"}, 5e-3),
    ],
)
def test_exact_output_law_converges(method, order, options, tol):
    """The output law -> the data marginal at t0; the variance bias shrinks with NFE."""
    mu, s = 0.3, 0.5
    biases = []
    for nfe in (50, 100, 200):
        ts = deis.time_grid(VP, nfe, "quadratic")
        table = get_method(method).build(VP, ts, order, **options)
        mean, var = output_law(table, VP, mu, s)
        mean_0, var_0 = exact_marginal(VP, ts[-1], mu, s)
        assert abs(mean - mean_0) < 1e-12
        biases.append(var / var_0 - 1)
    assert abs(biases[-1]) < tol, biases
    assert abs(biases[-1]) < 0.6 * abs(biases[0]), biases


# --- Monte Carlo through get_sampler -------------------------------------------------------------


@pytest.mark.parametrize("options", [{"lam": 0.5}, {"lam": 1.0}])
def test_gaussian_moments_match_exact_distribution(options):
    sampler = deis.get_sampler(VP, gaussian_eps_fn(VP), method="sddim", nfe=800, **options)
    assert_moments_match(VP, sampler, seed=0)


def test_batch_size_invariance():
    sampler = deis.get_sampler(VP, gaussian_eps_fn(VP), method="sddim", nfe=6, lam=1.0)
    assert sampler.stochastic and sampler.nfe == 6
    assert_batch_size_invariant(sampler, seed=2)
    x_T = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match="PRNG key"):
        sampler(x_T)
