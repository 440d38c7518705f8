"""Noise schedules: reference values, stable forms near t = 0, exact round trips."""

import json
import os

import jax
import numpy as np
import pytest
from tolerances import EPS64

from deis_jax.sampling.sde import VESDE, VPSDE, DiscreteVPSDE, EDMSchedule, SubVPSDE, get_sde
from deis_jax.sampling.timesteps import time_grid

pytestmark = pytest.mark.numerics  # schedule identities to float64 rounding and EDM's sigma grids

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_vp_linear_reference_values():
    # deis.md §1.2 / §8.8 (float64).
    s = VPSDE.linear(0.1, 20.0)
    np.testing.assert_allclose(s.alpha(1.0) ** 2, 4.3186e-5, rtol=1e-4)
    np.testing.assert_allclose(s.rho(1.0), 152.16697, rtol=1e-7)
    np.testing.assert_allclose(s.alpha(1e-3) ** 2, 0.99989006, rtol=1e-8)
    np.testing.assert_allclose(s.rho(1e-3), 0.010485993, rtol=1e-7)
    np.testing.assert_allclose(s.rho(1e-4), 0.00317798, rtol=1e-5)
    np.testing.assert_allclose(s.rho(1e-5), 0.0010005, rtol=1e-4)


def test_sigma_near_zero_has_no_cancellation():
    # sigma^2 = 1 - alpha^2 computed as -expm1(log alpha^2): at t = 1e-9 the naive form in
    # float64 loses ~7 digits; ours matches the series sqrt(beta_min t) to 1e-8 relative.
    s = VPSDE.linear(0.1, 20.0)
    t = 1e-9
    series = np.sqrt(s.beta_min * t + 0.5 * (s.beta_max - s.beta_min) * t**2)
    np.testing.assert_allclose(s.sigma(t), series, rtol=1e-8)


@pytest.mark.parametrize(
    "schedule, lo, hi",
    [
        (VPSDE.linear(), 1e-5, 1.0),
        (VPSDE.cosine(), 1e-7, 0.9946),
        (SubVPSDE(), 1e-5, 1.0),
        (VESDE(), 1e-5, 1.0),
        (EDMSchedule(), 0.002, 80.0),
    ],
    ids=["vp", "cosine", "subvp", "ve", "edm"],
)
def test_round_trips_t_rho_t(schedule, lo, hi):
    t = np.geomspace(lo, hi, 2000)
    # atol: for VE, t(rho) = log(rho/sigma_min)/L is ill-conditioned as t -> 0 (cond ~ 1/(tL)).
    np.testing.assert_allclose(schedule.t_from_rho(schedule.rho(t)), t, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(
        schedule.t_from_log_snr(schedule.log_snr(t)), t, rtol=1e-12, atol=1e-15
    )
    assert np.all(np.diff(schedule.rho(t)) > 0)


def test_marginals_are_consistent():
    for s in (VPSDE.linear(), VPSDE.cosine(), SubVPSDE(), VESDE(), EDMSchedule()):
        t = np.linspace(0.01, 0.99, 50)
        np.testing.assert_allclose(s.sigma(t) / s.alpha(t), s.rho(t), rtol=1e-14)
        np.testing.assert_allclose(s.log_snr(t), np.log(s.alpha(t) ** 2 / s.sigma(t) ** 2))
    vp = VPSDE.linear()
    np.testing.assert_allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, 1.0, rtol=1e-14)
    sub = SubVPSDE()
    np.testing.assert_allclose(sub.sigma(t), 1 - sub.alpha(t) ** 2, rtol=1e-13)
    ve = VESDE(0.01, 50.0)
    np.testing.assert_allclose(ve.sigma(t), 0.01 * 5000.0**t, rtol=1e-13)
    assert ve.prior_std == 50.0


def test_cosine_is_normalised_and_matches_the_textbook_form():
    s = VPSDE.cosine(0.008)
    assert s.alpha(0.0) == 1.0
    t = np.linspace(0.05, 0.95, 19)
    f = np.cos(0.5 * np.pi * (t + 0.008) / 1.008) / np.cos(0.5 * np.pi * 0.008 / 1.008)
    np.testing.assert_allclose(s.alpha(t), f, rtol=1e-13)
    np.testing.assert_allclose(s.rho(t), np.sqrt(1 - f**2) / f, rtol=1e-12)


def test_vp_beta_is_minus_dlog_alpha_bar():
    jax.config.update("jax_enable_x64", True)
    for s in (VPSDE.linear(), VPSDE.cosine()):
        for t in (0.1, 0.5, 0.9):
            grad = jax.grad(lambda u, s=s: -2.0 * s.log_alpha(u))(jax.numpy.float64(t))
            np.testing.assert_allclose(grad, s.beta(t), rtol=1e-10)


def test_discrete_schedule_from_betas():
    betas = np.linspace(1e-4, 0.02, 1000)
    s = DiscreteVPSDE.from_betas(betas)
    abar = np.cumprod(1 - betas)
    n = np.arange(1000)
    np.testing.assert_allclose(s.alpha(n) ** 2, abar, rtol=1e-12)
    assert s.t_max == 999 and s.default_t1 == 999 and s.default_t0 == 0
    np.testing.assert_allclose(s.rho(0.0), np.sqrt(1e-4 / (1 - 1e-4)), rtol=1e-12)
    # log alpha is piecewise linear in between; the inverse is exact everywhere.
    t = np.linspace(0, 999, 4001)
    np.testing.assert_allclose(s.t_from_rho(s.rho(t)), t, atol=1e-9)
    np.testing.assert_array_equal(s.model_time(n), n)
    shifted = DiscreteVPSDE.from_betas(betas, index_offset=-1.0)
    np.testing.assert_array_equal(shifted.model_time(n), n - 1)


def test_model_time_conventions():
    assert VPSDE.linear().model_time(0.5) == 999 * 0.5
    assert SubVPSDE(num_scales=2000).model_time(1.0) == 1999
    np.testing.assert_allclose(VESDE().model_time(0.3), VESDE().sigma(0.3))


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: VPSDE(schedule="quad"), "VPSDE.schedule must be one of"),
        (lambda: VPSDE.linear(beta_min=-1), "beta_min"),
        (lambda: VESDE(sigma_min=5, sigma_max=1), "sigma_min < sigma_max"),
        (lambda: DiscreteVPSDE.from_betas([0.1, 1.5]), "betas must lie in"),
        (lambda: EDMSchedule(sigma_min=80.0, sigma_max=0.002), "sigma_min < sigma_max"),
        (lambda: VPSDE.cosine(t_max=0.999), r"VPSDE\.t_max must be <= 0\.997998"),
        (lambda: get_sde("karras"), r"sde.name must be one of .*'edm'"),
    ],
)
def test_bad_schedules_fail_clearly(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_edm_schedule_is_time_as_noise_level():
    s = get_sde("edm", sigma_min=0.02, sigma_max=80.0)
    assert isinstance(s, EDMSchedule) and s.prior_std == 80.0
    assert s.interval() == (0.02, 80.0) and (s.t_min, s.t_max) == (0.02, 80.0)
    t = np.geomspace(0.02, 80.0, 7)
    alpha, sigma = s.marginal(t)
    np.testing.assert_array_equal(alpha, 1.0)
    np.testing.assert_array_equal(sigma, t)
    np.testing.assert_array_equal(s.rho(t), t)
    np.testing.assert_array_equal(s.t_from_rho(t), t)
    np.testing.assert_array_equal(s.model_time(t), t)  # EDM's preconditioners take sigma
    np.testing.assert_allclose(s.log_snr(t), -2 * np.log(t), rtol=1e-15)
    x = s.prior_sample(jax.random.PRNGKey(0), (4000, 1), jax.numpy.float64)
    np.testing.assert_allclose(np.std(np.asarray(x)), 80.0, rtol=0.05)


@pytest.mark.parametrize(
    "key, sigma_min, num_points",
    [("edm_sampler_N18_edm_precond", 0.002, 18), ("edm_sampler_N18_ve_precond", 0.02, 18),
     ("diff_sampler_polynomial_N7", 0.002, 7)],
)  # fmt: skip
def test_karras_grid_on_edm_is_edms_sigma_grid(key, sigma_min, num_points):
    # EDM: t_i = (smax^(1/7) + i/(N-1) (smin^(1/7) - smax^(1/7)))^7, i < N (then t_N = 0, which
    # is final_denoise here). Equal to float64 rounding; the ends are exact by construction.
    # The rounding (here and in EDM's PyTorch alike): a few ulp in the base (up to |smax^(1/7)|
    # / |base| ~ 5 from the sum) times 7 from the power: 64 ulp (measured <= 17).
    rtol = 64 * EPS64
    with open(os.path.join(FIXTURES, "edm", "sigma_grids.json")) as f:
        reference = np.array(json.load(f)[key][:-1])
    schedule = EDMSchedule(sigma_min=sigma_min)
    for kind, power in (("karras", None), ("rho", 7.0)):
        ts = time_grid(schedule, num_points - 1, kind, power=power)
        np.testing.assert_allclose(ts, reference, rtol=rtol, atol=0)
        assert (ts[0], ts[-1]) == (80.0, sigma_min)


def test_cosine_domain_ends_where_beta_reaches_the_iddpm_clip():
    s = VPSDE.cosine()
    np.testing.assert_allclose(s.beta(s.t_max), 999.0, rtol=1e-12)
    np.testing.assert_allclose(s.t_max, 0.997998, atol=1e-6)
    assert s.default_t1 == 0.9946 < s.t_max and np.isfinite(s.rho(s.t_max))
    assert VPSDE.linear().t_max == 1.0  # the linear schedule keeps its [0, 1]


@pytest.mark.parametrize(
    "schedule, t0, t1, message",
    [
        (VPSDE.cosine(), None, 1.0, r"t1 must be <= 0\.99799800\d* \(the schedule's t_max\), "
         r"got 1\.0: VPSDE\(cosine\)'s valid interval is \[0, 0\.997998\]; beyond it beta\(t\) "
         r"> 999.* t1 = 0\.9946, the schedule.s default"),
        (VPSDE.linear(), None, 1.5, r"t1 must be <= 1\.0 \(the schedule's t_max\), got 1\.5: "
         r"VPSDE\(linear\)'s valid interval is \[0, 1\]"),
        (VESDE(), None, 2.0, r"t1 must be <= 1\.0 .*VESDE's valid interval is \[0, 1\]"),
        (EDMSchedule(), 0.001, None, r"t0 must be >= 0\.002 \(the schedule's t_min\), got 0\.001: "
         r"EDMSchedule's valid interval is \[0\.002, 80\]"),
        (EDMSchedule(), None, 100.0, r"t1 must be <= 80\.0 .*EDMSchedule's"),
        (DiscreteVPSDE.linear(), None, 1000.0, r"t1 must be <= 999\.0 .*DiscreteVPSDE's"),
        (VPSDE.linear(), float("nan"), None, r"t0 must be a finite number"),
        (VPSDE.linear(beta_max=2000.0), None, None, r"t1=1\.0 gives rho = sigma/alpha = inf"),
    ],
    ids=["cosine", "vp", "ve", "edm-t0", "edm-t1", "discrete", "nan", "overflow"],
)  # fmt: skip
def test_every_schedule_refuses_an_interval_outside_its_domain(schedule, t0, t1, message):
    with pytest.raises(ValueError, match=message):
        schedule.interval(t0, t1)
