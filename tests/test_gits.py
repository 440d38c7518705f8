"""GITS: jump costs between teacher nodes, the DP over paths, and the searched grid."""

import itertools

import jax
import numpy as np
import pytest

import deis_jax as deis
from deis_jax.evaluation.reference import reference_solve
from deis_jax.fitting.gits import dp_path, gits_grid, jump_costs
from deis_jax.fitting.teacher import Teacher, solve_teacher
from deis_jax.sampling.sampler import make_plan, sample
from deis_jax.sampling.wrappers import model_argument

SDE = deis.VPSDE.linear()
GAUSS_MEAN = np.array([1.0, -0.5, 0.3, 2.0])
GAUSS_STD = 0.5


# --- the DP ---------------------------------------------------------------------------------


def _objective(cost, path, gamma):
    return sum(gamma**k * cost[a, b] for k, (a, b) in enumerate(itertools.pairwise(path)))


def _brute_force(cost, num_steps, gamma):
    m = cost.shape[0]
    paths = [[0, *inner, m - 1] for inner in itertools.combinations(range(1, m - 1), num_steps - 1)]
    values = [_objective(cost, p, gamma) for p in paths]
    return paths[int(np.argmin(values))], min(values)


def test_dp_path_equals_brute_force():
    rng = np.random.default_rng(0)
    for m in (2, 3, 5, 7, 9):
        for trial in range(3):
            cost = rng.normal(size=(m, m)) + (0.5 if trial else 0.0)  # negative costs too
            for num_steps in range(1, m):
                for gamma in (0.5, 1.0, 1.15, 2.0):
                    path = dp_path(cost, num_steps, gamma)
                    best_path, best = _brute_force(cost, num_steps, gamma)
                    assert len(path) == num_steps + 1 and path[0] == 0 and path[-1] == m - 1
                    assert np.all(np.diff(path) > 0)
                    np.testing.assert_allclose(_objective(cost, path, gamma), best, rtol=1e-12)
                    assert path == best_path


def test_dp_path_ignores_the_lower_triangle():
    rng = np.random.default_rng(1)
    cost = rng.uniform(size=(6, 6))
    messy = cost.copy()
    messy[np.tril_indices(6)] = -1e9  # would win every time if it were read
    assert dp_path(messy, 3) == dp_path(cost, 3)


def test_dp_path_on_additive_costs_finds_the_known_optimum():
    rng = np.random.default_rng(2)
    m = 12
    f = np.cumsum(rng.uniform(size=m))
    penalty = rng.permutation(m).astype(float)  # distinct: a unique optimum
    # gamma = 1: the f part telescopes, so the best path visits the cheapest interior nodes
    cost = f[None, :] - f[:, None] + penalty[None, :]
    for num_steps in range(1, m):
        interior = sorted(np.argsort(penalty[1:-1])[: num_steps - 1] + 1)
        assert dp_path(cost, num_steps, gamma=1.0) == [0, *map(int, interior), m - 1]
    # cost = gap: gamma > 1 makes later jumps dearer, so all the slack goes first, and
    # gamma < 1 puts it last
    gap = np.arange(m)[None, :] - np.arange(m)[:, None] + 0.0
    for num_steps in range(2, m):
        assert dp_path(gap, num_steps, 1.3) == [0, *range(m - num_steps, m)]
        assert dp_path(gap, num_steps, 0.7) == [*range(num_steps), m - 1]


@pytest.mark.parametrize(
    "cost, num_steps, gamma, match",
    [
        (np.zeros((5, 5)), 5, 1.15, r"num_steps must be in \[1, 4\]"),
        (np.zeros((5, 5)), 0, 1.15, r"num_steps must be in \[1, 4\]"),
        (np.zeros((5, 5)), 2.0, 1.15, "num_steps must be an integer"),
        (np.zeros((5, 5)), 2, 0.0, "gamma must be a finite number > 0"),
        (np.zeros((5, 5)), 2, -1.0, "gamma must be a finite number > 0"),
        (np.zeros((5, 5)), 2, np.inf, "gamma must be a finite number > 0"),
        (np.zeros((5, 4)), 2, 1.15, "square"),
        (np.full((5, 5), np.nan), 2, 1.15, "NaN"),
        (np.full((5, 5), np.inf), 2, 1.15, "no finite-cost path"),
    ],
)
def test_dp_path_validates(cost, num_steps, gamma, match):
    with pytest.raises(ValueError, match=match):
        dp_path(cost, num_steps, gamma)


# --- jump costs on a single Gaussian, where the ODE is solved exactly -----------------------


def _exact_gaussian_teacher(num_steps: int, n: int = 16) -> Teacher:
    """Exact states (``v(rho) = mu + (v_T - mu) sqrt((s^2 + rho^2)/(s^2 + rho_T^2))``, see
    ``deis_jax.evaluation.analytic``) and exact eps on a log-SNR grid."""
    ts = deis.time_grid(SDE, num_steps, "log_snr")
    alpha, rho = SDE.alpha(ts), SDE.rho(ts)
    x_T = np.random.default_rng(0).normal(size=(n, GAUSS_MEAN.size))
    factor = np.sqrt((GAUSS_STD**2 + rho**2) / (GAUSS_STD**2 + rho[0] ** 2))
    v = GAUSS_MEAN + (x_T / alpha[0] - GAUSS_MEAN)[:, None, :] * factor[None, :, None]
    states = v * alpha[None, :, None]
    eps_fn = _gaussian_eps()
    eps = np.stack([np.asarray(eps_fn(states[:, k], ts[k])) for k in range(num_steps)], axis=1)
    return Teacher(ts, x_T, states[:, -1], states, eps, {}, 0.0)


def _gaussian_eps():
    return jax.jit(deis.GaussianMixture.gaussian(GAUSS_MEAN, GAUSS_STD).eps_fn(SDE))


@pytest.mark.numerics
def test_jump_cost_is_the_ddim_error_on_the_two_point_grid():
    eps_fn = model_argument(_gaussian_eps())
    teacher = solve_teacher(SDE, eps_fn, np.ones((3, 4)), num_points=9, substeps=1)
    costs = {metric: jump_costs(teacher, SDE, metric) for metric in ("l2", "l1")}
    cost_v = jump_costs(teacher, SDE, "l2", space="v")
    alpha = SDE.alpha(teacher.ts)
    run = jax.jit(sample, static_argnums=0)
    base = make_plan(SDE, teacher.ts[[0, 1]], method="ddim")  # one compile for every pair
    for i, j in [(0, 1), (0, 8), (2, 5), (6, 7), (3, 8)]:
        table = make_plan(SDE, [teacher.ts[i], teacher.ts[j]], method="ddim").table
        out = run(base, eps_fn, teacher.states[:, i], table=table)
        out = np.asarray(out)
        diff = out - teacher.states[:, j]
        l2 = np.mean(np.sqrt(np.mean(diff**2, axis=-1)))
        l1 = np.mean(np.abs(diff))
        np.testing.assert_allclose(costs["l2"][i, j], l2, rtol=1e-10)
        np.testing.assert_allclose(costs["l1"][i, j], l1, rtol=1e-10)
        np.testing.assert_allclose(cost_v[i, j], l2 / alpha[j], rtol=1e-10)
    for cost in (*costs.values(), cost_v):
        assert np.all(np.isinf(cost[np.tril_indices(9)]))
        assert np.all(np.isfinite(cost[np.triu_indices(9, 1)]))


@pytest.mark.numerics
def test_adjacent_jump_cost_vanishes_at_ddim_local_rate():
    """DDIM's local error is O(h^2): halving the log-SNR step divides every adjacent cost
    (from the same node) by about 4."""
    coarse, fine = (np.diag(jump_costs(_exact_gaussian_teacher(m), SDE), 1) for m in (80, 160))
    slopes = np.log2(coarse / fine[::2])
    assert np.all((slopes > 1.7) & (slopes < 2.3)), slopes
    assert 1.9 < np.log2(coarse.max() / fine.max()) < 2.1


@pytest.mark.numerics
def test_dev_cost_vanishes_on_straight_trajectories():
    """For a single Gaussian every v = x / alpha trajectory is a straight line through mu, and
    so is every DDIM jump along it: the deviation cost in v is zero, the l2 cost is not."""
    teacher = _exact_gaussian_teacher(20)
    upper = np.triu_indices(21, 1)
    assert np.max(np.abs(jump_costs(teacher, SDE, "dev", space="v")[upper])) < 1e-12
    assert np.min(jump_costs(teacher, SDE, "l2", space="v")[upper]) > 1e-8


def test_jump_costs_do_not_depend_on_the_chunking():
    teacher = _exact_gaussian_teacher(10)
    for metric in ("l2", "l1", "dev"):
        whole = jump_costs(teacher, SDE, metric)
        np.testing.assert_allclose(
            jump_costs(teacher, SDE, metric, max_elements=50), whole, rtol=1e-12, atol=1e-15
        )


def test_jump_costs_validate():
    teacher = _exact_gaussian_teacher(4)
    with pytest.raises(ValueError, match=r"metric must be one of \('l2', 'l1', 'dev'\)"):
        jump_costs(teacher, SDE, "bdev")
    with pytest.raises(ValueError, match="space must be one of"):
        jump_costs(teacher, SDE, space="sigma")
    no_states = Teacher(teacher.ts, teacher.x_T, teacher.x0, None, None, {}, 0.0)
    with pytest.raises(ValueError, match="keep_states=True"):
        jump_costs(no_states, SDE)
    with pytest.raises(ValueError, match="num_steps must be in"):
        gits_grid(teacher, SDE, 5)
    with pytest.raises(ValueError, match="gamma"):
        gits_grid(teacher, SDE, 2, gamma=0)


# --- the searched grid on the ring mixture --------------------------------------------------


@pytest.fixture(scope="module")
def ring():
    mixture = deis.GaussianMixture.ring()
    eps_fn = mixture.eps_fn(SDE)
    rng = np.random.default_rng(0)
    teacher = solve_teacher(SDE, eps_fn, rng.normal(size=(128, 2)))
    x_held_out = rng.normal(size=(256, 2))
    ref = reference_solve(SDE, eps_fn, x_held_out, t0=SDE.default_t0, t1=SDE.default_t1, steps=200)
    assert ref.error_estimate < 1e-6
    return teacher, eps_fn, x_held_out, ref


def _held_out_rmse(ring, method, order, grids):
    """Held-out RMSE of ``method`` on each grid (one compile: the tables are arguments)."""
    _, eps_fn, x_held_out, ref = ring
    plan = make_plan(SDE, grids[0], method=method, order=order)
    run = jax.jit(sample, static_argnums=0)
    errors = []
    for ts in grids:
        x0 = run(plan, model_argument(eps_fn), x_held_out, table=plan.build_table(ts))
        errors.append(float(np.sqrt(np.mean((np.asarray(x0) - ref.x0) ** 2))))
    return errors


def test_gits_grid_is_a_subgrid_with_exact_endpoints(ring):
    teacher = ring[0]
    for metric in ("l2", "l1", "dev"):
        grid = gits_grid(teacher, SDE, 5, metric=metric)
        assert grid.dtype == np.float64 and grid.shape == (6,)
        assert grid[0] == teacher.ts[0] and grid[-1] == teacher.ts[-1]
        assert np.all(np.diff(grid) < 0) and np.all(np.isin(grid, teacher.ts))


@pytest.mark.numerics
def test_gits_beats_the_uniform_subgrid_for_ddim(ring):
    """DDIM is the student the jump cost models exactly: at NFE 5 its GITS grid beats the
    fine (log-SNR) grid's uniform subsample on held-out starting points."""
    teacher = ring[0]
    gits, uniform = _held_out_rmse(ring, "ddim", 0, [gits_grid(teacher, SDE, 5), teacher.ts[::12]])
    assert gits < 0.8 * uniform, (gits, uniform)
