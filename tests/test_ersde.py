"""ER-SDE-Solvers (``ersde``): equivalences, exactness, local order, golden scalars, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import quad
from stochastic_checks import MU, S, assert_batch_size_invariant, assert_moments_match

import deis_jax as deis
from deis_jax.evaluation.analytic import GaussianMixture
from deis_jax.sampling.solvers import get_method
from deis_jax.sampling.solvers.stochastic import (
    ERSDE_PHI_NAMES,
    NOISE_SCALES,
    build_ersde,
    ersde_step_scalars,
)

jax.config.update("jax_enable_x64", True)

VP = deis.VPSDE.linear()
VE_EDM = deis.VESDE(sigma_min=0.002, sigma_max=80.0)


def gaussian_eps_fn(schedule, mu=MU, s=S):
    """Exact eps for data N(mu, diag(s^2)) (``deis_jax.evaluation.analytic``)."""
    return GaussianMixture.gaussian(mu, s).eps_fn(schedule)


def ve_grid(rho):
    return VE_EDM.t_from_rho(np.asarray(rho, np.float64))


def poly7(n, lo=0.002, hi=80.0):
    i = np.arange(n)
    return (hi ** (1 / 7) + i / (n - 1) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7


# --- equivalences ------------------------------------------------------------------------------


@pytest.mark.numerics
def test_phi_identity_is_ddim_exactly():
    eps_fn = gaussian_eps_fn(VP)
    x_T = jax.random.normal(jax.random.key(0), (16, 2), jnp.float64)
    er = deis.get_sampler(VP, eps_fn, method="ersde", order=1, nfe=12, phi="ode", grid="quadratic")
    ddim = deis.get_sampler(VP, eps_fn, method="ddim", nfe=12)
    assert np.all(er.table.out_noise == 0.0)  # no leaked noise (variance computed w/o cancellation)
    assert not er.stochastic
    np.testing.assert_allclose(jax.jit(er)(x_T), jax.jit(ddim)(x_T), rtol=1e-12, atol=1e-12)
    # the update itself: r x + (1 - r) x0 == psi x + c eps
    psi, c = deis.ddim_coefficients(VP, er.ts)
    tab = er.table
    np.testing.assert_allclose(tab.out_x + tab.out_k[:, 0] * tab.pred_x[:, 0], psi, rtol=1e-13)
    np.testing.assert_allclose(tab.out_k[:, 0] * tab.pred_eps[:, 0], c, rtol=1e-12)


@pytest.mark.parametrize("schedule", [VP, deis.DiscreteVPSDE.linear()], ids=["vp", "discrete"])
def test_phi_square_is_ancestral_ddpm(schedule):
    nfe = 10
    ts = deis.time_grid(schedule, nfe, "quadratic")
    er = get_method("ersde").build(schedule, ts, 1, phi="sde")
    # DDPM posterior q(x_s | x_t, x0) with abar = alpha^2: mean coefficients and variance
    abar = np.asarray(schedule.alpha(ts), np.float64) ** 2
    a_t, a_s = abar[:-1], abar[1:]
    var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
    coef_x0 = np.sqrt(a_s) * (1 - a_t / a_s) / (1 - a_t)
    coef_xt = np.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t)
    np.testing.assert_allclose(er.out_noise**2, var, rtol=1e-12)
    # ersde: x_s = out_x x_t + out_k x0  (x0 = data prediction)
    np.testing.assert_allclose(er.out_x, coef_xt, rtol=1e-12)
    np.testing.assert_allclose(er.out_k[:, 0], coef_x0, rtol=1e-12)
    if schedule.is_discrete:
        return
    # and it is sddim with lam = 1: same samples with the same key
    eps_fn = gaussian_eps_fn(schedule)
    x_T = jax.random.normal(jax.random.key(1), (8, 2), jnp.float64)
    key = jax.random.key(2)
    a = jax.jit(deis.get_sampler(schedule, eps_fn, ts, method="ersde", order=1, phi="sde"))
    b = jax.jit(deis.get_sampler(schedule, eps_fn, ts, method="sddim", lam=1.0))
    a, b = a(x_T, key), b(x_T, key)
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.numerics
def test_vp_step_is_alpha_times_ve_step():
    """Same rho grid, same eps in (v, rho): VP output / alpha == VE output, same noise."""
    rho = poly7(9, lo=0.01, hi=60.0)
    vp_ts, ve_ts = VP.t_from_rho(rho), ve_grid(rho)
    x_v = jax.random.normal(jax.random.key(3), (6, 2), jnp.float64) * 60.0
    key = jax.random.key(4)
    vp = deis.get_sampler(VP, gaussian_eps_fn(VP), vp_ts, method="ersde", order=3)
    ve = deis.get_sampler(VE_EDM, gaussian_eps_fn(VE_EDM), ve_ts, method="ersde", order=3)
    a_T, a_0 = float(VP.alpha(vp_ts[0])), float(VP.alpha(vp_ts[-1]))
    out_vp, out_ve = jax.jit(vp)(a_T * x_v, key), jax.jit(ve)(x_v, key)
    np.testing.assert_allclose(out_vp / a_0, out_ve, rtol=1e-9, atol=1e-9)


@pytest.mark.numerics
def test_denoise_to_zero_equals_final_denoise():
    eps_fn = gaussian_eps_fn(VE_EDM)
    x_T = 80.0 * jax.random.normal(jax.random.key(5), (4, 2), jnp.float64)
    ts = ve_grid(poly7(7))
    opts = {"method": "ersde", "phi": "ode"}  # deterministic: the relation is about the mean
    a = deis.get_sampler(VE_EDM, eps_fn, ts, denoise_to_zero=True, **opts)
    b = deis.get_sampler(VE_EDM, eps_fn, ts, final_denoise=True, **opts)
    assert a.nfe == b.nfe == 7
    np.testing.assert_allclose(jax.jit(a)(x_T), jax.jit(b)(x_T), rtol=1e-13, atol=1e-13)
    # with noise the appended step injects none: its noise scale is exactly 0
    stochastic = get_method("ersde").build(VE_EDM, ts, 3, denoise_to_zero=True)
    assert stochastic.num_steps == 7 and stochastic.out_noise[-1] == 0.0
    assert stochastic.out_k[-1, 0] == 1.0 and stochastic.out_x[-1] == 0.0
    # both at once would add the step twice: the ersde spec refuses it
    with pytest.raises(ValueError, match="options.denoise_to_zero and final_denoise both add"):
        deis.get_sampler(VE_EDM, eps_fn, ts, denoise_to_zero=True, final_denoise=True, **opts)


# --- exactness and local order -------------------------------------------------------------


PHI_PRIME = {
    "sde_5": lambda x: np.exp(x**0.3) + 10.0 + 0.3 * x**0.3 * np.exp(x**0.3),
    "sde_2": lambda x: 1.5 * x**0.5,
    "sde": lambda x: 2.0 * x,
}


def exact_mean_increment(name, s, t, x0):
    """``phi(t) int_t^s phi'/phi^2 x0(rho) drho`` by adaptive quadrature."""
    phi, dphi = NOISE_SCALES[name].phi, PHI_PRIME[name]
    val = quad(lambda r: dphi(r) / phi(r) ** 2 * x0(r), t, s, epsabs=0, epsrel=1e-12, limit=200)
    return float(phi(np.float64(t))) * val[0]


def row_increment(table, k, x0_values):
    """Table row k applied to data predictions ``(x0_k, x0_{k-1}, x0_{k-2})`` (alpha = 1)."""
    return table.out_k[k, 0] * x0_values[0] + table.out_hist[k] @ x0_values[1 : 1 + table.history]


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["sde_5", "sde_2", "sde"])
def test_ersde2_exact_for_affine_x0(name):
    rho = poly7(8)
    ts = ve_grid(rho)
    x0 = lambda r: 0.7 - 1.3 * r  # noqa: E731
    exact_tab = build_ersde(VE_EDM, ts, 2, phi=name)
    riemann_tab = build_ersde(VE_EDM, ts, 2, phi=name, quadrature="riemann")
    worst_riemann = 0.0
    for k in range(1, len(rho) - 1):
        vals = np.array([x0(rho[k - j]) if k - j >= 0 else 0.0 for j in range(3)])
        want = exact_mean_increment(name, rho[k], rho[k + 1], x0)
        got = row_increment(exact_tab, k, vals)
        assert abs(got - want) <= 1e-10 * max(1.0, abs(want)), (k, got, want)
        worst_riemann = max(worst_riemann, abs(row_increment(riemann_tab, k, vals) - want))
    assert worst_riemann > 1e-5  # the authors' Riemann sums are not exact


def local_errors(order, order3, hs, name="sde_5", rho_k=1.0):
    x0 = lambda r: np.sin(2.0 * r) + 0.5 * np.exp(-r)  # noqa: E731
    errs = []
    for h in hs:
        rho = rho_k + h * np.array([2.0, 1.0, 0.0, -1.0])
        tab = build_ersde(VE_EDM, ve_grid(rho), order, phi=name, order3=order3)
        vals = np.array([x0(rho[2]), x0(rho[1]), x0(rho[0])])
        errs.append(abs(row_increment(tab, 2, vals) - exact_mean_increment(name, 1.0, 1.0 - h, x0)))
    errs = np.array(errs)
    return errs[:-1] / errs[1:]


@pytest.mark.numerics
def test_local_error_ratios():
    hs = [0.04, 0.02, 0.01, 0.005]
    r2 = local_errors(2, "authors", hs)
    r3a = local_errors(3, "authors", hs)
    r3c = local_errors(3, "corrected", hs)
    print("ER-SDE local error ratios per halving: order2", r2, "authors3", r3a, "corrected3", r3c)
    np.testing.assert_allclose(r2[-1], 8.0, rtol=0.05)
    np.testing.assert_allclose(r3a[-1], 8.0, rtol=0.05)  # authors' order 3: still O(h^3)
    np.testing.assert_allclose(r3c[-1], 16.0, rtol=0.05)  # corrected: O(h^4)


@pytest.mark.numerics
def test_corrected_order3_exact_for_quadratic_x0():
    rho = poly7(8)
    ts = ve_grid(rho)
    x0 = lambda r: 0.2 + 0.5 * r - 0.03 * r**2  # noqa: E731
    corrected = build_ersde(VE_EDM, ts, 3, order3="corrected")
    authors = build_ersde(VE_EDM, ts, 3, order3="authors")
    for k in range(2, len(rho) - 1):
        vals = np.array([x0(rho[k - j]) for j in range(3)])
        want = exact_mean_increment("sde_5", rho[k], rho[k + 1], x0)
        assert abs(row_increment(corrected, k, vals) - want) <= 1e-9 * max(1.0, abs(want))
        if k == 2:
            assert abs(row_increment(authors, k, vals) - want) > 1e-4


# --- golden values (amed_ersde spec 5, item 16) ------------------------------------------------

GOLDEN = {  # r, std (official clip), c1 riemann, c1 exact, c2 riemann, c2 exact
    0: (1.39896414e-1, 2.16913049e1, -34.32471, -34.56523, 760.5067, 776.0661),
    1: (1.56943370e-1, 4.40668094, -11.45605, -11.53488, 85.93617, 87.67348),
    2: (1.35695740e-1, 5.51596189e-1, -3.248533, -3.269806, 6.612521, 6.732510),
    3: (8.06490668e-2, 3.43170000e-2, -0.6767812, -0.6809046, 0.2620929, 0.2660418),
    4: (2.26058023e-2, 0.0, -0.07526325, -0.07569772, 2.948050e-3, 2.984985e-3),
}


@pytest.mark.numerics
def test_golden_scalars():
    rho = np.append(poly7(6), 0.0)
    exact = ersde_step_scalars(rho, "sde_5", "exact", official_clip=True)
    riemann = ersde_step_scalars(rho, "sde_5", "riemann", riemann_points=100, official_clip=True)
    unclipped = ersde_step_scalars(rho, "sde_5", "exact")
    worst = 0.0
    for k, (r, std, c1r, c1e, c2r, c2e) in GOLDEN.items():
        for got, want in [
            (exact.r[k], r),
            (riemann.r[k], r),
            (exact.noise_std[k], std),
            (riemann.c1[k], c1r),
            (exact.c1[k], c1e),
            (riemann.c2[k], c2r),
            (exact.c2[k], c2e),
        ]:
            rel = abs(got - want) / abs(want) if want else abs(got)
            worst = max(worst, rel)
            assert rel <= 1e-6, (k, got, want)
    print(f"golden ER-SDE scalars: worst relative deviation {worst:.2e}")
    # the official clip kills the legitimate noise of step 4 (true std 5.48e-4)
    np.testing.assert_allclose(unclipped.noise_std[4], 5.48e-4, rtol=1e-3)
    # the final step to rho = 0: r = 0, no noise
    assert exact.r[5] == 0.0 and exact.noise_std[5] == 0.0 and exact.one_minus_r[5] == 1.0


@pytest.mark.numerics
def test_exact_quadrature_matches_closed_forms():
    rho = poly7(10)
    s, t = rho[:-1], rho[1:]
    for name, p in [("ode", 1.0), ("sde", 2.0), ("sde_2", 1.5), ("sde_3", 2.5)]:
        sc = ersde_step_scalars(rho, name)
        phi_t = t**p
        if p == 1.0:
            s1 = np.log(s / t)
            s2 = (s - t) - s * np.log(s / t)
        else:
            s1 = (s ** (1 - p) - t ** (1 - p)) / (1 - p)
            first = np.log(s / t) if p == 2.0 else (s ** (2 - p) - t ** (2 - p)) / (2 - p)
            s2 = first - s * s1
        np.testing.assert_allclose(sc.c1, (t - s) + phi_t * s1, rtol=1e-12)
        np.testing.assert_allclose(sc.c2, 0.5 * (t - s) ** 2 + phi_t * s2, rtol=1e-10)


# --- options and validation ----------------------------------------------------------------


@pytest.mark.numerics
def test_phi_names_and_callable():
    ts = deis.time_grid(VP, 8, "karras")
    for name in ERSDE_PHI_NAMES:
        build_ersde(VP, ts, 3, phi=name)
    named = build_ersde(VP, ts, 3, phi="sde_5")
    custom = build_ersde(VP, ts, 3, phi=lambda x: x * (np.exp(x**0.3) + 10.0))
    alias = build_ersde(VP, ts, 3, phi="type_7")
    for a, b, c in zip(named, custom, alias, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)
        np.testing.assert_array_equal(a, c)


def test_invalid_options_raise():
    ts = deis.time_grid(VP, 8, "karras")
    with pytest.raises(ValueError, match="non-decreasing"):
        build_ersde(VP, ts, 2, phi=np.sqrt)  # phi(x)/x decreasing: negative variance
    with pytest.raises(ValueError, match="finite positive"):
        build_ersde(VP, ts, 2, phi=lambda x: np.full_like(x, np.nan))
    with pytest.raises(ValueError, match="phi"):
        build_ersde(VP, ts, 2, phi="sde_9")
    with pytest.raises(ValueError, match="quadrature"):
        build_ersde(VP, ts, 2, quadrature="simpson")
    with pytest.raises(ValueError, match="order3"):
        build_ersde(VP, ts, 3, order3="official")
    with pytest.raises(ValueError, match=r"options has unknown key\(s\) \['lam'\]"):
        deis.get_sampler(VP, gaussian_eps_fn(VP), method="ersde", nfe=5, lam=1.0)


# --- sampling: distribution and batch invariance ------------------------------------------------


@pytest.mark.parametrize(
    "order,options",
    [(1, {"phi": "sde_2"}), (2, {"phi": "sde"}), (3, {"phi": "sde_5"})],
)
def test_gaussian_moments_match_exact_distribution(order, options):
    nfe = 200 if order > 1 else 500
    sampler = deis.get_sampler(
        VP, gaussian_eps_fn(VP), method="ersde", order=order, nfe=nfe, **options
    )
    assert_moments_match(VP, sampler, seed=10)


def test_batch_size_invariance():
    sampler = deis.get_sampler(VP, gaussian_eps_fn(VP), method="ersde", order=3, nfe=6)
    assert_batch_size_invariant(sampler, seed=12)
