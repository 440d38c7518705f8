"""Step tables are pure array functions of the time grid: the numpy float64 build and the
``jax.numpy`` build (under ``jax.jit``, and differentiated with ``jax.grad``) are one code path.

x64 is enabled for the whole session by ``tests/conftest.py``; the autouse fixture below (the
``jax.enable_x64`` context) makes this module independent of that.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close_ulp

import deis_jax
from deis_jax.sampling.sde import get_sde
from deis_jax.sampling.solvers import StepTable, get_method
from deis_jax.sampling.solvers.dpm_solver import phi_functions
from deis_jax.sampling.solvers.table import data_prediction, eps_prediction, multistep_table
from deis_jax.sampling.timesteps import time_grid

VP = deis_jax.VPSDE.linear()
VE = get_sde("vesde")
STEP_COUNTS = (1, 2, 3, 5, 8)

# Every deterministic method and order, and the main options (defaults: lower_order_final=True,
# order3='authors', variant='bh2'); checked at 8 steps, where the multistep methods go through
# the warm-up, full-order steps and the lowered final orders.
ALL_CASES = (
    [("ddim", 0, {})]
    + [(name, order, {}) for name in ("tab", "rhoab", "ipndm") for order in range(4)]
    + [
        ("rhork", order, {"tableau": tableau})
        for order, tableau in ((1, "euler"), (2, "heun"), (3, "kutta3"), (4, "rk4"))
    ]
    + [(name, order, {}) for name in ("dpmpp", "unipc") for order in (1, 2, 3)]
    + [
        ("dpmpp", 2, {"lower_order_final": False}),
        ("dpmpp", 3, {"lower_order_final": False}),
        ("dpmpp", 3, {"order3": "corrected"}),
        ("dpmpp", 3, {"order3": "corrected", "lower_order_final": False}),
        ("unipc", 1, {"variant": "bh1"}),
        ("unipc", 2, {"variant": "bh1"}),
        ("unipc", 3, {"variant": "bh1", "lower_order_final": False}),
        ("unipc", 3, {"variant": "bh2", "lower_order_final": False}),
    ]
)
# At fewer steps (degenerate shapes, warm-up only): each method at its highest order(s).
FEW_STEP_CASES = [
    ("ddim", 0, {}),
    ("tab", 3, {}),
    ("rhoab", 3, {}),
    ("ipndm", 3, {}),
    ("rhork", 4, {"tableau": "rk4"}),
    ("dpmpp", 3, {}),
    ("unipc", 3, {}),
]
# One case per method for the gradients, and a few for the VE schedule.
GRAD_CASES = [
    ("ddim", 0, {}),
    ("tab", 3, {}),
    ("rhoab", 3, {}),
    ("ipndm", 3, {}),
    ("rhork", 4, {"tableau": "rk4"}),
    ("dpmpp", 3, {"order3": "corrected"}),
    ("unipc", 3, {"variant": "bh1", "lower_order_final": False}),
]
VE_CASES = [("tab", 3, {}), ("rhork", 3, {"tableau": "kutta3"}), ("dpmpp", 3, {}), ("unipc", 3, {})]
# XLA compile time is what this file spends its time on: build many tables per jitted
# function, with the cheaper CPU code generation (IEEE semantics are kept either way).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _case_id(case) -> str:
    name, order, opts = case
    return "-".join([name, str(order), *(f"{k}={v}" for k, v in sorted(opts.items()))])


def _build(case, schedule, ts) -> StepTable:
    name, order, opts = case
    return get_method(name).build(schedule, ts, order, **opts)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _assert_tables_equal(traced: StepTable, ref: StepTable, rtol: float = 1e-12, msg="") -> None:
    for field, got, want in zip(StepTable._fields, traced, ref, strict=True):
        assert isinstance(got, jax.Array), (msg, field)
        assert isinstance(want, np.ndarray) and want.dtype == np.float64, (msg, field)
        assert got.dtype == jnp.float64 and got.shape == want.shape, (msg, field)
        np.testing.assert_allclose(
            np.asarray(got), want, rtol=rtol, atol=0, err_msg=f"{msg}: {field}"
        )


@pytest.mark.numerics
@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_jitted_tables_equal_numpy_tables(num_steps):
    # (case, schedule, grid); everything at one step count is built in one jitted function
    items = [
        (case, VP, time_grid(VP, num_steps, get_method(case[0]).default_grid))
        for case in (ALL_CASES if num_steps == 8 else FEW_STEP_CASES)
    ]
    if num_steps == 5:  # VE: alpha = 1, a different t(rho); orders 1, 2, 3, 2, 1
        items += [(case, VE, time_grid(VE, num_steps, "karras")) for case in VE_CASES]

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def build_all(grids):
        return [_build(case, sched, g) for (case, sched, _), g in zip(items, grids, strict=True)]

    traced = build_all([jnp.asarray(grid) for _, _, grid in items])
    for (case, sched, grid), table in zip(items, traced, strict=True):
        msg = f"{_case_id(case)} {type(sched).__name__}"
        _assert_tables_equal(table, _build(case, sched, grid), msg=msg)


@pytest.mark.numerics
def test_table_helpers_follow_the_namespace_of_their_inputs():
    ts = time_grid(VP, 4, "quadratic")
    alpha, sigma = VP.alpha(ts), VP.sigma(ts)
    coefs = np.arange(8.0).reshape(4, 2) / 7.0
    noise = np.linspace(0.1, 0.4, 4)

    def build(ts, alpha, sigma, coefs, noise):
        pred = data_prediction(alpha[:-1], sigma[:-1])
        return multistep_table(ts, alpha[1:] / alpha[:-1], coefs, prediction=pred, out_noise=noise)

    ref = build(ts, alpha, sigma, coefs, noise)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float64 for a in ref)
    np.testing.assert_allclose(ref.pred_eps[:, 0], -sigma[:-1] / alpha[:-1], rtol=1e-15)
    np.testing.assert_array_equal(ref.out_hist, coefs[:, 1:])
    args = [jnp.asarray(a) for a in (ts, alpha, sigma, coefs, noise)]
    _assert_tables_equal(jax.jit(build)(*args), ref)
    # eps prediction and the zero noise default
    eps_ref = multistep_table(ts, alpha[1:] / alpha[:-1], coefs)
    np.testing.assert_array_equal(eps_ref.pred_x, np.zeros((4, 1)))
    np.testing.assert_array_equal(eps_ref.out_noise, np.zeros(4))
    traced = jax.jit(lambda t, c: multistep_table(t, VP.alpha(t[1:]) / VP.alpha(t[:-1]), c))
    _assert_tables_equal(traced(jnp.asarray(ts), jnp.asarray(coefs)), eps_ref)
    pred_x, pred_eps = eps_prediction(3, 2, jnp)
    assert isinstance(pred_x, jax.Array) and pred_x.shape == (3, 2)
    np.testing.assert_array_equal(pred_eps, np.ones((3, 2)))


# --- gradients ----------------------------------------------------------------------------


def _objective(case, grid: np.ndarray, xp):
    """A fixed random weighted sum of every table field, as a function of the interior."""
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=a.shape) for a in _build(case, VP, grid)]

    def f(inner):
        ts = xp.concatenate([xp.asarray(grid[:1]), inner, xp.asarray(grid[-1:])])
        table = _build(case, VP, ts)
        return sum(xp.sum(w * a) for w, a in zip(weights, table, strict=True))

    return f


def _lambda_grid(steps) -> np.ndarray:
    """The grid from t = 1 with the given steps in ``lambda = -log rho``."""
    lam = -np.log(VP.rho(1.0)) + np.cumsum([0.0, *steps])
    ts = VP.t_from_rho(np.exp(-lam))
    ts[0] = 1.0
    return ts


def _close_grid(grid: np.ndarray, k: int, dlam: float) -> np.ndarray:
    """``grid`` with point k + 1 moved to ``lambda_k + dlam`` (``lambda = -log rho``)."""
    out = grid.copy()
    out[k + 1] = VP.t_from_rho(VP.rho(grid[k]) * np.exp(-dlam))
    assert np.all(np.diff(out) < 0)
    return out


def test_grad_of_tables_matches_finite_differences():
    # lambda steps above and below 1: both branches of phi_n(-h) (series for |h| < 1)
    grids = [_lambda_grid([2.5, 0.6, 2.0, 0.4, 3.0])] * len(GRAD_CASES)
    assert 1e-4 < grids[0][-1] < 0.1
    f_np = [_objective(case, g, np) for case, g in zip(GRAD_CASES, grids, strict=True)]
    f_jax = [_objective(case, g, jnp) for case, g in zip(GRAD_CASES, grids, strict=True)]
    # endpoints are fixed by the objectives, so the same function serves the close grids
    all_value_and_grad = jax.jit(
        lambda inners: [jax.value_and_grad(f)(x) for f, x in zip(f_jax, inners, strict=True)],
        compiler_options=FAST_COMPILE,
    )

    results = all_value_and_grad([jnp.asarray(g[1:-1]) for g in grids])
    for case, grid, f, (value, grad) in zip(GRAD_CASES, grids, f_np, results, strict=True):
        msg = _case_id(case)
        inner = grid[1:-1]
        np.testing.assert_allclose(value, f(inner), rtol=1e-12, err_msg=msg)
        fd = np.empty_like(inner)
        for i in range(inner.size):
            up, down = inner.copy(), inner.copy()
            up[i] += 1e-6 * inner[i]
            down[i] -= 1e-6 * inner[i]
            fd[i] = (f(up) - f(down)) / (up[i] - down[i])
        assert np.all(np.abs(fd) > 1e-3 * np.abs(fd).max()), msg  # every point matters
        np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-5, err_msg=msg)

    # Two interior points Delta lambda = 1e-8 apart (the phi series branch at z = -1e-8, and
    # ratios r ~ 1e-8 in the next step): value and gradient stay finite, and the traced value
    # agrees with numpy (up to the conditioning of the lambda differences).
    closes = [_close_grid(g, 2, 1e-8) for g in grids]
    results = all_value_and_grad([jnp.asarray(g[1:-1]) for g in closes])
    for case, close, f, (value, grad) in zip(GRAD_CASES, closes, f_np, results, strict=True):
        msg = _case_id(case)
        assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad))), msg
        assert np.abs(np.asarray(grad)).max() > 0, msg
        np.testing.assert_allclose(value, f(close[1:-1]), rtol=1e-6, err_msg=msg)


@pytest.mark.numerics
def test_phi_functions_trace_and_differentiate_in_both_branches():
    zs = np.array([-30.0, -3.0, -1.5, -1.0, -0.999, -0.5, -1e-3, -1e-8, 0.0, 0.3, 2.0])
    ref = np.stack([phi_functions(z, 4) for z in zs])  # scalars: numpy float64
    assert ref.dtype == np.float64 and ref.shape == (zs.size, 4)
    # vectorised == scalar up to numpy's loops: a 0-d and a strided array may take another exp
    # kernel (SIMD vs libm, an ulp), which the recurrence's cancellation near |z| = 1 grows ~10x
    assert_close_ulp(phi_functions(zs, 4), ref, ulps=32)
    weights = jnp.arange(1.0, 5.0)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def values_and_derivatives(z):
        phi = functools.partial(phi_functions, n_max=4)
        vjp = jax.grad(lambda z: jnp.sum(phi(z) * weights))(z)  # reverse mode
        return phi(z), jax.vmap(jax.jacfwd(phi))(z), vjp  # forward mode

    traced, jac, g = values_and_derivatives(jnp.asarray(zs))
    assert isinstance(traced, jax.Array)
    np.testing.assert_allclose(np.asarray(traced), ref, rtol=1e-14)
    # phi_n(0) = 1/n!, and near 0 the series (not the cancelling recurrence) is used
    inv_fact = [1 / math.factorial(n) for n in range(1, 5)]
    np.testing.assert_allclose(np.asarray(traced[zs == 0.0][0]), inv_fact, rtol=1e-15)
    z = -1e-8
    np.testing.assert_allclose(
        np.asarray(traced[zs == z][0]),
        [1 / math.factorial(n) + z / math.factorial(n + 1) for n in range(1, 5)],
        rtol=1e-15,
    )

    # d phi_n / dz: exact at 0 (= 1/(n+1)!) and NaN-free although the recurrence divides by z;
    # elsewhere central differences of the numpy evaluation.
    jac, g = np.asarray(jac), np.asarray(g)
    assert np.all(np.isfinite(jac)) and np.all(np.isfinite(g))
    np.testing.assert_allclose(
        jac[zs == 0.0][0], [1 / math.factorial(n) for n in range(2, 6)], rtol=1e-14
    )
    np.testing.assert_allclose(g, jac @ np.arange(1.0, 5.0), rtol=1e-12)
    smooth = np.abs(np.abs(zs) - 1.0) > 0.01  # away from the branch switch at |z| = 1
    h = 1e-6 * np.maximum(np.abs(zs), 1.0)
    fd = (phi_functions(zs + h, 4) - phi_functions(zs - h, 4)) / (2 * h)[:, None]
    np.testing.assert_allclose(jac[smooth], fd[smooth], rtol=1e-7)


# --- golden values: the numpy tables are unchanged ------------------------------------------
# Computed with the implementation before the tables became traceable (numpy float64 only).

GOLDEN = {
    ("dpmpp", 3, ()): {
        "out_x": [
            0.9990253315856746,
            0.9578156294481294,
            0.4556769121954476,
            0.16305917462194303,
            0.14748042240096568,
        ],
        "out_k": [
            0.03806091476232511,
            0.3717017179527034,
            1.6114060867171813,
            1.2760895974589133,
            0.8528378171845422,
        ],
        "out_hist": [
            [0.0, 0.0],
            [-0.12390057265090111, 0.0],
            [-1.1882735510145674, 0.344410087060327],
            [-0.4253631991529709, 0.0],
            [0.0, 0.0],
        ],
        "pred_x": [
            152.17025611266948,
            22.408413159752662,
            3.441810981920862,
            1.11118871830487,
            1.00253701416891,
        ],
    },
    ("unipc", 3, (("variant", "bh2"),)): {
        "out_k": [
            0.03806091476232511,
            0.38992938746792744,
            1.7706868537841969,
            1.342460244021336,
            0.9246137382526906,
        ],
        "out_hist": [
            [0.0, 0.0, 0.0],
            [-0.14212824216612513, 0.0, 0.0],
            [-1.4898164837500365, 0.4866722527287803, 0.0],
            [-0.6244751388402394, 0.1991119396872686, -0.06637064656242286],
            [-0.12464200385782179, 0.05286608278967341, 0.0],
        ],
    },
    ("tab", 3, ()): {
        "out_k": [
            -16.991371074452104,
            -4.106789692248985,
            -1.5149368239723997,
            -0.6970106058113561,
            -0.2268882359901627,
        ],
        "out_hist": [
            [0.0, 0.0, 0.0],
            [0.8891861258167715, 0.0, 0.0],
            [0.6736787693522008, -0.15796108366726355, 0.0],
            [0.38566319120263115, -0.14697152874630395, 0.02290466512194205],
            [0.08171813762190781, -0.024044127524278456, 0.003106290077152916],
        ],
    },
    ("rhork", 3, (("tableau", "kutta3"),)): {
        "t": [
            [1.0, 0.9338909765691028, 0.6501592885125388],
            [0.05075928851253881, 0.024989561468842403, 0.001],
        ],
        "stage_k": [
            [0.0, 0.0, 0.0],
            [-0.8952804295978817, 0.0, 0.0],
            [16.991371074452104, -33.98274214890421, 0.0],
        ],
        "out_k": [-2.8318951790753504, -11.327580716301402, -2.8318951790753504],
    },
}


@pytest.mark.numerics
@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda key: key[0])
def test_numpy_tables_are_unchanged(key):
    name, order, opts = key
    spec = get_method(name)
    table = spec.build(VP, time_grid(VP, 5, spec.default_grid), order, **dict(opts))
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float64 for a in table)
    got = {
        "out_x": table.out_x,
        "out_k": table.out_k[:, 0] if table.num_stages == 1 else table.out_k[0],
        "out_hist": table.out_hist,
        "pred_x": table.pred_x[:, 0],
        "t": table.t[[0, -1]],
        "stage_k": table.stage_k[0],
    }
    for field, want in GOLDEN[key].items():
        np.testing.assert_allclose(got[field], want, rtol=1e-12, atol=1e-300, err_msg=field)
