"""Deterministic samplers against analytic oracles: equivalences, closed forms, convergence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as deis
from deis_jax.evaluation.analytic import GaussianMixture
from deis_jax.sampling.sde import EDMSchedule

VP = deis.VPSDE.linear(0.1, 20.0)
SCHEDULES = {
    "vp": (VP, 1e-3),
    "cosine": (deis.VPSDE.cosine(), 1e-3),
    "subvp": (deis.SubVPSDE(), 1e-3),
    "ve": (deis.VESDE(), 1e-5),
    "discrete": (deis.DiscreteVPSDE.linear(), None),
    "edm": (EDMSchedule(), None),
}
DETERMINISTIC = [("ddim", 0), *[(m, r) for m in ("tab", "rhoab", "ipndm") for r in range(4)]]
RK = [("rhork", 1), ("rhork", 2), ("rhork", 3), ("rhork", 4)]


def run(schedule, eps_fn, x, **kwargs):
    return np.asarray(jax.jit(deis.get_sampler(schedule, eps_fn, **kwargs))(x))


def mixture_eps(schedule, dim=3):
    return GaussianMixture.embedded(dim, 4, latent_dim=2, radius=1.5, std=0.3).eps_fn(schedule)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_order_zero_methods_equal_ddim(name):
    schedule, t0 = SCHEDULES[name]
    eps_fn = mixture_eps(schedule)
    x = schedule.prior_sample(jax.random.PRNGKey(0), (16, 3), jnp.float64)
    ddim = run(schedule, eps_fn, x, method="ddim", nfe=8, t0=t0)
    for method, order in [("tab", 0), ("rhoab", 0), ("ipndm", 0), ("rhork", 1)]:
        out = run(schedule, eps_fn, x, method=method, order=order, nfe=8, t0=t0)
        np.testing.assert_allclose(out, ddim, rtol=1e-12, atol=1e-12, err_msg=method)


def test_rhork_euler_tableau_name_equals_order_one():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3), jnp.float64)
    eps_fn = mixture_eps(VP)
    a = run(VP, eps_fn, x, method="rhork", order=1, nfe=6)
    b = run(VP, eps_fn, x, method="rhork", order=4, nfe=6, tableau="1euler")
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("method, order", DETERMINISTIC + RK)
def test_constant_eps_closed_form(name, method, order):
    # eps = 1 makes dv/drho = 1: x0 = alpha(t0) (x_T / alpha(T) + rho(t0) - rho(T)) exactly.
    schedule, t0 = SCHEDULES[name]
    x = jnp.full((2, 5), 0.7)
    sampler = deis.get_sampler(schedule, lambda x, t: jnp.ones_like(x), method=method,
                               order=order, nfe=9, nfe_rounding="up", t0=t0)  # fmt: skip
    ts = sampler.ts
    exact = schedule.alpha(ts[-1]) * (0.7 / schedule.alpha(ts[0]) + schedule.rho(ts[-1])
                                      - schedule.rho(ts[0]))  # fmt: skip
    np.testing.assert_allclose(np.asarray(jax.jit(sampler)(x)), exact, rtol=1e-11, atol=1e-12)


@pytest.mark.numerics
def test_constant_eps_official_setup_value():
    # deis.md §8.4: beta_0 = 0.01, N = 10, quadratic grid, x_T = 1 -> 0.0078321.
    s = deis.VPSDE.linear(0.01, 20.0)
    for method in ("tab", "rhoab", "ipndm"):
        out = run(s, lambda x, t: jnp.ones_like(x), jnp.ones((1, 1)), method=method, order=3,
                  nfe=10, t0=1e-3)  # fmt: skip
        np.testing.assert_allclose(out, 0.0078321, atol=5e-8)


GAUSS = GaussianMixture.gaussian([0.3], 0.5)
X_T = jax.random.normal(jax.random.PRNGKey(0), (4000, 1), jnp.float64)
EXACT = GAUSS.exact_flow(VP, np.asarray(X_T), 1.0, 1e-3)


def gaussian_rmse(**kwargs):
    out = run(VP, GAUSS.eps_fn(VP), X_T, t0=1e-3, **kwargs)
    return float(np.sqrt(np.mean((out - EXACT) ** 2)))


@pytest.mark.numerics
def test_point_mass_data_is_solved_exactly():
    # eps is constant along exact trajectories when the data is a point: exact for all.
    mu = 0.4
    eps_fn = lambda x, t: (x - VP.alpha(t) * mu) / VP.sigma(t)  # noqa: E731
    x = jnp.linspace(-2, 2, 7)[:, None]
    exact = VP.alpha(1e-3) * mu + VP.sigma(1e-3) / VP.sigma(1.0) * (x - VP.alpha(1.0) * mu)
    for method, order in DETERMINISTIC + RK:
        out = run(VP, eps_fn, x, method=method, order=order, nfe=7, nfe_rounding="up", t0=1e-3)
        np.testing.assert_allclose(out, exact, rtol=1e-11, atol=1e-12, err_msg=method)


@pytest.mark.numerics
def test_tab3_accuracy_on_gaussian_data():
    # Issue acceptance: VP 0.1/20, t0 = 1e-3, quadratic grid, mean 0.3, std 0.5.
    assert gaussian_rmse(method="tab", order=3, nfe=20, grid="quadratic") <= 8e-4
    assert gaussian_rmse(method="tab", order=3, nfe=50, grid="quadratic") <= 4e-5


EDM = EDMSchedule()
EDM_GAUSS = GaussianMixture.gaussian([0.3], 0.5)
EDM_X_T = EDM.prior_sample(jax.random.PRNGKey(1), (1000, 1), jnp.float64)
EDM_EXACT = EDM_GAUSS.exact_flow(EDM, np.asarray(EDM_X_T), 80.0, 0.002)


@pytest.mark.numerics
@pytest.mark.parametrize(
    "method, order, grid, min_slope, max_err",
    [("ddim", 0, "karras", 0.9, 5e-2), ("dpmpp", 2, "log_snr", 1.8, 1e-2),
     ("dpmpp", 3, "log_snr", 1.9, 2e-3), ("tab", 3, "karras", 3.2, 4e-3)],
)  # fmt: skip
def test_edm_schedule_integrates_the_exact_flow(method, order, grid, min_slope, max_err):
    # alpha = 1, sigma = t: the flow of Gaussian data is v(rho) = mu + (v - mu)
    # sqrt((s^2 + rho^2) / (s^2 + rho_T^2)) in closed form, here from 80 down to 0.002.
    # (DPM-Solver++(3M) converges at rate ~2 on this problem, on every schedule.)
    eps_fn = EDM_GAUSS.eps_fn(EDM)
    errs = [
        np.sqrt(np.mean((run(EDM, eps_fn, EDM_X_T, method=method, order=order, nfe=nfe,
                             grid=grid) - EDM_EXACT) ** 2))
        for nfe in (40, 80)
    ]  # fmt: skip
    assert errs[0] < max_err and np.log2(errs[0] / errs[1]) > min_slope, errs


def test_tab_equals_rhoab_on_edm():
    # t = rho on the EDM schedule: the Lagrange bases in t and in rho are the same.
    eps_fn = EDM_GAUSS.eps_fn(EDM)
    tab = run(EDM, eps_fn, EDM_X_T[:8], method="tab", order=3, nfe=12, grid="karras")
    rhoab = run(EDM, eps_fn, EDM_X_T[:8], method="rhoab", order=3, nfe=12, grid="karras")
    np.testing.assert_allclose(tab, rhoab, rtol=1e-12, atol=1e-12)


@pytest.mark.numerics
@pytest.mark.parametrize(
    "method, order, expected, tol",
    [
        ("tab", 0, 1, 0.1), ("tab", 1, 2, 0.15), ("tab", 2, 3, 0.2), ("tab", 3, 4, 0.3),
        ("rhoab", 1, 2, 0.15), ("rhoab", 2, 3, 0.3), ("rhoab", 3, 4, 0.45),
        ("rhork", 2, 2, 0.1), ("rhork", 3, 3, 0.15), ("rhork", 4, 4, 0.1),
        # Fixed uniform-step weights: only second order on a non-uniform grid.
        ("ipndm", 3, 2, 0.15),
    ],
)  # fmt: skip
def test_convergence_order_on_gaussian_data(method, order, expected, tol):
    stages = order if method == "rhork" else 1
    nfes = np.array([40, 80, 160]) * stages
    errs = [gaussian_rmse(method=method, order=order, nfe=int(n), grid="log_snr") for n in nfes]
    slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert abs(slope - expected) < tol, (slope, errs)


@pytest.mark.parametrize("method, order", DETERMINISTIC + RK)
@pytest.mark.parametrize("final_denoise", [False, True])
def test_nfe_spent_equals_nfe_reported(method, order, final_denoise):
    calls = []

    def eps_fn(x, t):
        calls.append(1)
        return x * 0.1

    sampler = deis.get_sampler(VP, eps_fn, method=method, order=order, nfe=7,
                               final_denoise=final_denoise, nfe_rounding="up")  # fmt: skip
    with jax.disable_jit():  # lax.scan runs as a Python loop: one call per evaluation
        sampler(jnp.ones((2, 3)))
    stages = order if method == "rhork" else 1  # rounded up to whole steps
    steps = -(-(7 - final_denoise) // stages)
    assert len(calls) == sampler.nfe == stages * steps + final_denoise


@pytest.mark.parametrize("method", deis.method_names())
def test_every_budget_is_spent_exactly_or_refused_by_name(method):
    """For every method, order, AFS and final step: a budget N*S - afs + final_denoise is
    spent exactly (the plan's NFE is the budget), any other is refused naming the budgets
    the method can spend; nothing is rounded silently."""
    spec = deis.get_method(method)
    for order in spec.orders:
        stages = spec.nfe_per_step(order, {})
        stochastic = deis.make_plan(VP, method=method, order=order, nfe=4 * stages).stochastic
        for afs in (False,) if stochastic else (False, True):
            for final in (False, True):
                offset = int(final) - int(afs)
                spendable = {stages * n + offset for n in range(1, 20)}
                for nfe in range(1, 13):
                    kwargs = dict(method=method, order=order, nfe=nfe, afs=afs,
                                  final_denoise=final)  # fmt: skip
                    if nfe in spendable:
                        assert deis.make_plan(VP, **kwargs).nfe == nfe, kwargs
                        continue
                    with pytest.raises(deis.MethodArgumentError, match=(
                            rf"nfe must be a budget that {method}.* spends exactly "
                            rf"\({stages} per step.*got {nfe} \(nearest: ")):  # fmt: skip
                        deis.make_plan(VP, **kwargs)
                    up = deis.make_plan(VP, **kwargs, nfe_rounding="up").nfe
                    assert up == min(b for b in spendable if b > nfe), kwargs


def test_budget_message_names_what_amed_can_spend():
    message = (r"nfe must be a budget that amed_ipndm order 3 with afs spends exactly \(2 per "
               r"step, 1 less in all with AFS\): odd NFE 1, 3, 5, 7, \.\.\.; got 4 \(nearest: "
               r"3 or 5; with afs=False it spends even NFE\)")  # fmt: skip
    with pytest.raises(deis.MethodArgumentError, match=message):
        deis.make_plan(VP, method="amed_ipndm", nfe=4, afs=True)
    with pytest.raises(deis.MethodArgumentError, match=r"even NFE 2, 4, 6, 8, .*got 3"):
        deis.make_plan(VP, method="amed_ipndm", nfe=3)


def test_budget_message_names_the_option_that_sets_the_cost():
    """rhoRK's cost per step comes from its tableau when one is given, not from ``order``."""
    with pytest.raises(deis.MethodArgumentError, match=(
            r"budget that rhork tableau='rk4' spends exactly \(4 per step\).*got 10")):  # fmt: skip
        deis.make_plan(VP, method="rhork", nfe=10, tableau="rk4")


@pytest.mark.numerics
def test_final_denoise_is_tweedie():
    eps_fn = mixture_eps(VP)
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 3), jnp.float64)
    plain = deis.get_sampler(VP, eps_fn, method="tab", nfe=9)
    denoised = run(VP, eps_fn, x, method="tab", nfe=10, final_denoise=True)  # 9 steps + 1
    x_t0 = np.asarray(plain(x))
    t0 = plain.ts[-1]
    tweedie = (x_t0 - VP.sigma(t0) * np.asarray(eps_fn(jnp.asarray(x_t0), t0))) / VP.alpha(t0)
    np.testing.assert_allclose(denoised, tweedie, rtol=1e-12)


@pytest.mark.numerics
def test_discrete_ddim_is_the_textbook_ddim():
    s = deis.DiscreteVPSDE.linear()
    eps_fn = mixture_eps(s)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3), jnp.float64)
    sampler = deis.get_sampler(s, eps_fn, method="ddim", nfe=10)
    abar = s.alphas_cumprod
    xk = np.asarray(x)
    for t, t_next in zip(sampler.ts[:-1], sampler.ts[1:], strict=True):
        a, a_next = abar[int(t)], abar[int(t_next)]
        eps = np.asarray(eps_fn(jnp.asarray(xk), t))
        x0 = (xk - np.sqrt(1 - a) * eps) / np.sqrt(a)
        xk = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps
    np.testing.assert_allclose(np.asarray(jax.jit(sampler)(x)), xk, rtol=1e-11)


def test_any_shape_with_leading_batch_axis_and_float32():
    eps_fn = lambda x, t: 0.5 * x  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3), jnp.float32)
    for method, order in [("tab", 3), ("rhork", 2), ("ipndm", 3)]:
        out = jax.jit(deis.get_sampler(VP, eps_fn, method=method, order=order, nfe=6))(x)
        assert out.shape == x.shape and out.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(out)))


def test_explicit_grid_and_sampler_metadata():
    ts = np.array([1.0, 0.6, 0.3, 0.1, 0.01])
    sampler = deis.get_sampler(VP, lambda x, t: x, ts, method="tab", order=2)
    np.testing.assert_array_equal(sampler.ts, ts)
    assert sampler.nfe == 4 and sampler.num_steps == 4 and not sampler.stochastic
    assert sampler.table.out_hist.shape == (4, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "heun", "nfe": 10}, "method must be one of"),
        ({"method": "tab", "order": 4, "nfe": 10}, r"order must be one of .* for method 'tab'"),
        ({"method": "rhork", "order": 0, "nfe": 10}, r"must be one of \(1, 2, 3, 4\)"),
        ({"method": "tab", "nfe": 0}, r"nfe must be an integer >= 1, got 0 \(method 'tab'"),
        ({"method": "tab"}, r"nfe must be an integer >= 1, got None"),
        ({"method": "tab", "nfe": 10.5}, r"nfe must be an integer >= 1, got 10\.5"),
        ({"method": "tab", "nfe": 10, "t0": 0.0}, "t0 must be > 0"),
        ({"method": "tab", "nfe": 10, "t0": 0.5, "t1": 0.2}, "t0 must be < t1"),
        ({"method": "tab", "nfe": 10, "tableau": "rk4"}, r"options has unknown key\(s\)"),
        ({"method": "tab", "nfe": 10, "grid_power": 3.0}, r"'quadratic' is 'time' with power 2"),
        ({"method": "rhork", "nfe": 10, "tableau": "midpoint"}, "tableau must be one of"),
    ],
)
def test_bad_arguments_fail_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        deis.get_sampler(VP, lambda x, t: x, **kwargs)
