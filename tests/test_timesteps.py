"""Time grids: the values of deis.md §3, exact endpoints, monotonicity, integer grids."""

import numpy as np
import pytest

from deis_jax.sampling.sde import VESDE, VPSDE, DiscreteVPSDE
from deis_jax.sampling.timesteps import GRID_KINDS, time_grid

pytestmark = pytest.mark.numerics  # golden grid values

VP = VPSDE.linear(0.1, 20.0)


def test_quadratic_grid_values():
    expected = [1, 0.8157021, 0.6501593, 0.5033716, 0.3753389, 0.2660614, 0.1755389,
                0.1037716, 0.0507593, 0.0165021, 0.001]  # fmt: skip
    np.testing.assert_allclose(time_grid(VP, 10, "quadratic", t0=1e-3), expected, atol=5e-8)


def test_rho_grid_values():
    expected = [1, 0.94421, 0.87979, 0.80365, 0.71076, 0.59214, 0.43285, 0.23267, 0.07771,
                0.01567, 0.001]  # fmt: skip
    np.testing.assert_allclose(time_grid(VP, 10, "rho", power=7, t0=1e-3), expected, atol=5e-6)
    np.testing.assert_array_equal(time_grid(VP, 10, "karras"), time_grid(VP, 10, "rho"))


def test_log_snr_grid_values():
    expected = [1, 0.89912, 0.78557, 0.65344, 0.49344, 0.30463, 0.14064, 0.05360, 0.01810,
                0.00499, 0.001]  # fmt: skip
    ts = time_grid(VP, 10, "log_snr", t0=1e-3)
    np.testing.assert_allclose(ts, expected, atol=5e-6)
    np.testing.assert_allclose(np.diff(VP.log_snr(ts)), np.diff(VP.log_snr(ts))[0], rtol=1e-12)


@pytest.mark.parametrize("kind", [k for k in GRID_KINDS if k != "custom"])
@pytest.mark.parametrize("schedule", [VP, VPSDE.cosine(), VESDE()], ids=["vp", "cos", "ve"])
def test_every_grid_is_decreasing_with_exact_endpoints(kind, schedule):
    t0 = schedule.default_t0
    ts = time_grid(schedule, 17, kind)
    assert ts.dtype == np.float64 and ts.size == 18
    assert ts[0] == schedule.default_t1 and ts[-1] == t0
    assert np.all(np.diff(ts) < 0)


def test_linear_and_power_grids():
    np.testing.assert_allclose(time_grid(VP, 4, "linear", t0=0.2), [1, 0.8, 0.6, 0.4, 0.2])
    ts = time_grid(VP, 5, "time", power=3, t0=1e-3)
    np.testing.assert_allclose(np.diff(np.cbrt(ts)), np.diff(np.cbrt(ts))[0], rtol=1e-12)


def test_discrete_integer_grid():
    s = DiscreteVPSDE.linear()
    ts = time_grid(s, 10, "quadratic")
    np.testing.assert_array_equal(ts, [999, 809, 639, 490, 360, 250, 160, 90, 40, 10, 0])
    dense = time_grid(s, 50, "quadratic")  # duplicates near 0 are refilled
    assert dense.size == 51 and np.all(np.diff(dense) < 0) and np.all(dense == np.rint(dense))
    assert dense[0] == 999 and dense[-1] == 0
    with pytest.raises(ValueError, match="at most 999 steps"):
        time_grid(s, 1000, "quadratic")


def test_custom_grid_is_validated():
    np.testing.assert_array_equal(time_grid(VP, kind="custom", custom=[1.0, 0.5, 0.1]),
                                  [1.0, 0.5, 0.1])  # fmt: skip
    with pytest.raises(ValueError, match="strictly decreasing"):
        time_grid(VP, kind="custom", custom=[1.0, 0.1, 0.5])
    with pytest.raises(ValueError, match="t0 must be > 0"):
        time_grid(VP, kind="custom", custom=[1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match=r"t1 must be <= 1\.0 \(the schedule's t_max\)"):
        time_grid(VP, kind="custom", custom=[1.5, 0.5, 0.1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "cubic"}, "grid kind must be one of"),
        ({"t0": 0.0}, "t0 must be > 0"),
        ({"t0": 0.5, "t1": 0.4}, "t0 must be < t1"),
        ({"power": -1.0, "kind": "time"}, "grid_power must be > 0"),
        ({"power": 3.0, "kind": "quadratic"}, r"'quadratic' is 'time' with power 2"),
        ({"power": 2.0, "kind": "linear"}, r"'linear' is 'time' with power 1"),
        ({"power": 5.0, "kind": "karras"}, r"applies to the grid kinds \('time', 'rho'\)"),
        ({"power": 5.0, "kind": "log_snr"}, "'log_snr' has no power"),
    ],
)
def test_bad_grids_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        time_grid(VP, 10, **kwargs)
