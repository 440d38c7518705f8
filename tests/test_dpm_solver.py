"""DPM-Solver++ (``dpmpp``) and UniPC (``unipc``): reference updates, exactness, orders."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as deis
from deis_jax.evaluation.analytic import GaussianMixture
from deis_jax.sampling.solvers import get_method
from deis_jax.sampling.solvers.dpm_solver import phi_functions, step_orders

jax.config.update("jax_enable_x64", True)

pytestmark = pytest.mark.numerics  # reference updates and convergence orders

VP = deis.VPSDE.linear()
MU, S = np.array([0.3, -1.0]), np.array([0.5, 1.5])


def gaussian_eps_fn(schedule, mu=MU, s=S):
    """Exact eps for data N(mu, diag(s^2)) (``deis_jax.evaluation.analytic``)."""
    return GaussianMixture.gaussian(mu, s).eps_fn(schedule)


def gaussian_flow(v_T, rho_T, rho_0, mu=MU, s=S):
    """Exact probability-flow map in v = x/alpha."""
    return mu + (v_T - mu) * np.sqrt((s**2 + rho_0**2) / (s**2 + rho_T**2))


def x0_numpy(schedule, mu=MU, s=S):
    def x0(x, t):
        a, rho = float(schedule.alpha(np.float64(t))), float(schedule.rho(np.float64(t)))
        v = x / a
        return v - rho * rho * (v - mu) / (s**2 + rho**2)

    return x0


def grid_quantities(schedule, ts):
    alpha = np.asarray(schedule.alpha(ts), np.float64)
    sigma = np.asarray(schedule.sigma(ts), np.float64)
    return alpha, sigma, -np.log(np.asarray(schedule.rho(ts), np.float64))


# --- reference loops written directly from the published update formulas ---------------------


def dpmpp_reference(schedule, ts, x, x0_fn, order, orders, third_weight=1.0):
    alpha, sigma, lam = grid_quantities(schedule, ts)
    ms = []
    for k, q in enumerate(orders):
        ms.append(x0_fn(x, ts[k]))
        h = lam[k + 1] - lam[k]
        phi_1 = math.expm1(-h)
        new = sigma[k + 1] / sigma[k] * x - alpha[k + 1] * phi_1 * ms[-1]
        if q == 2:
            r0 = (lam[k] - lam[k - 1]) / h
            new = new - 0.5 * alpha[k + 1] * phi_1 * (ms[-1] - ms[-2]) / r0
        elif q == 3:
            r0, r1 = (lam[k] - lam[k - 1]) / h, (lam[k - 1] - lam[k - 2]) / h
            d1_0, d1_1 = (ms[-1] - ms[-2]) / r0, (ms[-2] - ms[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            new = new + alpha[k + 1] * phi_2 * d1 - third_weight * alpha[k + 1] * phi_3 * d2
        x = new
    return x


def unipc_reference(schedule, ts, x, x0_fn, orders, variant="bh2"):
    """Predictor-corrector loop: model at the predicted x, reused as history; no final UniC."""
    alpha, sigma, lam = grid_quantities(schedule, ts)
    ms = [x0_fn(x, ts[0])]
    n = len(orders)
    for k, p in enumerate(orders):
        h = lam[k + 1] - lam[k]
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = math.expm1(hh) if variant == "bh2" else hh
        b, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1.0
        for i in range(1, p + 1):
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / fact
        rks = [(lam[k - j] - lam[k]) / h for j in range(1, p)] + [1.0]
        d = [(ms[k - j] - ms[k]) / rks[j - 1] for j in range(1, p)]
        vander = np.array([[r ** (i - 1) for r in rks] for i in range(1, p + 1)])
        base = sigma[k + 1] / sigma[k] * x - alpha[k + 1] * h_phi_1 * ms[k]
        if p == 1:
            pred = 0.0
        else:
            a = [0.5] if p == 2 else np.linalg.solve(vander[:-1, :-1], b[:-1])
            pred = sum(a_j * d_j for a_j, d_j in zip(a, d, strict=True))
        x_pred = base - alpha[k + 1] * b_h * pred
        if k == n - 1:
            return x_pred
        m_new = x0_fn(x_pred, ts[k + 1])
        a_c = [0.5] if p == 1 else np.linalg.solve(vander, b)
        corr = sum(a_j * d_j for a_j, d_j in zip(a_c[:-1], d, strict=True))
        x = base - alpha[k + 1] * b_h * (corr + a_c[-1] * (m_new - ms[k]))
        ms.append(m_new)
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("nfe", [6, 11])
def test_dpmpp_matches_reference_update(order, nfe):
    x_T = np.linspace(-2.0, 2.0, 10).reshape(5, 2)
    for order3, weight in (("authors", 1.0), ("corrected", 2.0)):
        sampler = deis.get_sampler(
            VP, gaussian_eps_fn(VP), method="dpmpp", order=order, nfe=nfe, order3=order3
        )
        orders = step_orders(nfe, order, True, 10)
        want = dpmpp_reference(VP, sampler.ts, x_T, x0_numpy(VP), order, orders, weight)
        np.testing.assert_allclose(jax.jit(sampler)(x_T), want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_matches_reference_predictor_corrector(order, variant):
    x_T = np.linspace(-2.0, 2.0, 10).reshape(5, 2)
    nfe = 7
    sampler = deis.get_sampler(
        VP, gaussian_eps_fn(VP), method="unipc", order=order, nfe=nfe, variant=variant
    )
    orders = step_orders(nfe, order, True, None)
    want = unipc_reference(VP, sampler.ts, x_T, x0_numpy(VP), orders, variant)
    np.testing.assert_allclose(jax.jit(sampler)(x_T), want, rtol=1e-11, atol=1e-12)


def test_order_one_dpmpp_is_ddim():
    ts = deis.time_grid(VP, 10, "log_snr")
    tab = get_method("dpmpp").build(VP, ts, 1)
    psi, c = deis.ddim_coefficients(VP, ts)
    np.testing.assert_allclose(tab.out_x + tab.out_k[:, 0] * tab.pred_x[:, 0], psi, rtol=1e-13)
    np.testing.assert_allclose(tab.out_k[:, 0] * tab.pred_eps[:, 0], c, rtol=1e-12)
    assert np.all(tab.out_hist == 0)


@pytest.mark.parametrize("method", ["dpmpp", "unipc"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_exact_for_point_mass_data(method, order):
    """Constant data prediction: every order is exact (the difference weights sum to 0)."""
    mu = np.array([0.4, -0.7])
    ts = deis.time_grid(VP, 8, "quadratic")
    tab = get_method(method).build(VP, ts, order)
    alpha, sigma, _ = grid_quantities(VP, ts)
    x = x_T = np.array([1.3, -0.2])
    hist = [np.zeros(2)] * tab.history
    for k in range(tab.num_steps):
        eps = (x - alpha[k] * mu) / sigma[k]
        out = tab.pred_x[k, 0] * x + tab.pred_eps[k, 0] * eps
        x = (
            tab.out_x[k] * x
            + tab.out_k[k, 0] * out
            + sum(tab.out_hist[k, j] * hist[j] for j in range(tab.history))
        )
        hist = [out] + hist[:-1]
    rho = VP.rho(ts)
    want = alpha[-1] * (mu + (x_T / alpha[0] - mu) * rho[-1] / rho[0])
    np.testing.assert_allclose(x, want, rtol=1e-12, atol=1e-14)


# --- convergence on Gaussian data ------------------------------------------------------------


def observed_order(method, order, nfes=(20, 40, 80, 160), **options):
    eps_fn = gaussian_eps_fn(VP)
    v_T = np.stack([np.linspace(-3, 3, 9), np.linspace(2, -4, 9)], axis=1)
    errs = []
    for nfe in nfes:
        sampler = deis.get_sampler(VP, eps_fn, method=method, order=order, nfe=nfe, **options)
        ts = sampler.ts
        a_T, a_0 = float(VP.alpha(ts[0])), float(VP.alpha(ts[-1]))
        x = np.asarray(jax.jit(sampler)(jnp.asarray(a_T * v_T)))
        exact = gaussian_flow(v_T, float(VP.rho(ts[0])), float(VP.rho(ts[-1])))
        errs.append(np.abs(x / a_0 - exact).max())
    slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    return slope, errs


def test_convergence_orders():
    grid = {"grid": "log_snr"}
    results = {
        "dpmpp 2M": observed_order("dpmpp", 2, **grid),
        "dpmpp 3M corrected": observed_order("dpmpp", 3, order3="corrected", **grid),
        "dpmpp 3M authors": observed_order("dpmpp", 3, **grid),
        "unipc 1": observed_order("unipc", 1, **grid),
        "unipc 2": observed_order("unipc", 2, **grid),
    }
    for name, (slope, errs) in results.items():
        print(f"{name}: slope {slope:.2f}, errors {np.array2string(np.array(errs), precision=2)}")
    assert 1.85 < results["dpmpp 2M"][0] < 2.3
    assert results["dpmpp 3M corrected"][0] > 2.8
    # the published 3M weights the x0'' term by 1/2: second order asymptotically
    assert 1.9 < results["dpmpp 3M authors"][0] < 2.8
    assert 1.85 < results["unipc 1"][0] < 2.3  # UniP-1 + UniC-1
    assert 2.8 < results["unipc 2"][0] < 3.3  # UniP-2 + UniC-2


def test_dpmpp_third_order_local_error():
    """One 3M step with exact history on x0(lambda) = sin(lambda) + 0.3 lambda^2."""
    f = lambda lam: np.sin(lam) + 0.3 * lam**2  # noqa: E731
    ratios = {}
    for order3 in ("authors", "corrected"):
        errs = []
        for h in (0.01, 0.005, 0.0025):
            lam = 0.3 + h * np.array([-2.0, -1.0, 0.0, 1.0])
            ts = VP.t_from_rho(np.exp(-lam))
            tab = get_method("dpmpp").build(VP, ts, 3, lower_order_final=False, order3=order3)
            a, sig, lam = grid_quantities(VP, ts)
            got = tab.out_k[2, 0] * f(lam[2]) + tab.out_hist[2] @ np.array([f(lam[1]), f(lam[0])])
            # exact: sigma_t int e^lam x0 dlam, by 40-point Gauss-Legendre
            nodes, weights = np.polynomial.legendre.leggauss(40)
            u = lam[2] + (lam[3] - lam[2]) * (nodes + 1) / 2
            exact = sig[3] * (lam[3] - lam[2]) / 2 * np.sum(weights * np.exp(u) * f(u))
            errs.append(abs(got - exact))
        ratios[order3] = errs[0] / errs[1], errs[1] / errs[2]
    print("DPM++ 3M local error ratios per halving:", ratios)
    np.testing.assert_allclose(ratios["authors"][-1], 8.0, rtol=0.06)
    np.testing.assert_allclose(ratios["corrected"][-1], 16.0, rtol=0.06)


# --- options, orders per step, registry ------------------------------------------------------


def test_step_orders():
    assert step_orders(5, 3, True, 10) == [1, 2, 3, 2, 1]
    assert step_orders(12, 3, True, 10) == [1, 2] + [3] * 10
    assert step_orders(12, 3, True, None) == [1, 2] + [3] * 8 + [2, 1]
    assert step_orders(5, 3, False, None) == [1, 2, 3, 3, 3]
    assert step_orders(1, 3, True, None) == [1]


def test_registry_and_validation():
    for name in ("dpmpp", "unipc"):
        spec = get_method(name)
        assert spec.default_grid == "log_snr" and spec.orders == (1, 2, 3)
        assert spec.nfe_per_step(2, {}) == 1
    eps_fn = gaussian_eps_fn(VP)
    assert deis.get_sampler(VP, eps_fn, method="unipc", order=3, nfe=5).nfe == 5
    with pytest.raises(ValueError, match="order3"):
        deis.get_sampler(VP, eps_fn, method="dpmpp", order=3, nfe=5, order3="x")
    with pytest.raises(ValueError, match="variant"):
        deis.get_sampler(VP, eps_fn, method="unipc", nfe=5, variant="bh3")
    with pytest.raises(ValueError, match="lower_order_final"):
        deis.get_sampler(VP, eps_fn, method="dpmpp", nfe=5, lower_order_final="yes")
    with pytest.raises(ValueError, match="lower_order_final_below"):
        deis.get_sampler(VP, eps_fn, method="dpmpp", nfe=5, lower_order_final_below=0)


def test_phi_functions_series_and_recursion_agree():
    for z in (-0.3, -0.999, -1.0, -1.001, -3.0, -30.0, 0.5):
        direct = [
            math.expm1(z) / z,
            (math.expm1(z) - z) / z**2,
            (math.expm1(z) - z - z**2 / 2) / z**3,
        ]
        np.testing.assert_allclose(phi_functions(z, 3), direct, rtol=1e-12)
    for z in (0.0, -1e-8, -1e-4):  # the direct forms cancel here; compare with Taylor
        taylor = [1 + z / 2 + z**2 / 6, 1 / 2 + z / 6 + z**2 / 24, 1 / 6 + z / 24 + z**2 / 120]
        np.testing.assert_allclose(phi_functions(z, 3), taylor, rtol=1e-12)
