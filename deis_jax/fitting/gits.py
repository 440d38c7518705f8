"""GITS: a time grid searched by dynamic programming over a teacher's fine grid.

Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling" (ICML 2024);
``fitting.md`` section 1. The student grid is a subset of the teacher's fine grid
``ts[0] = t1 > ... > ts[M-1] = t0``, chosen to minimise a sum of local jump costs.

**Jump cost.** For every pair of fine nodes ``i < j``, one exponential-integrator Euler (DDIM)
step from the teacher state ``x_i`` with the model output there, ``eps_i``,

    x_hat_{i->j} = alpha_j (x_i / alpha_i + (rho_j - rho_i) eps_i),

is compared with the teacher state ``x_j`` (this is EDM's Euler step in sigma written in our
variables: EDM's ``x`` is ``v = x / alpha`` and its sigma is ``rho``). The cost ignores the
student's history, whatever the student is (multistep or not): it is a solver-agnostic local
proxy; the chosen nodes are then run with the real student. Metrics, per sample then averaged
over samples (``D`` = number of dimensions):

``l2``   ``||x_hat - x_j||_2 / sqrt(D)`` (RMS over dimensions);
``l1``   ``||x_hat - x_j||_1 / D``;
``dev``  signed deviation from the straight line through the trajectory's ends:
         ``dev(y) = ||(x_end - y) - <x_end - y, u> u|| / sqrt(D)`` with
         ``u = (x_end - x_start) / ||x_end - x_start||`` per sample, and
         ``cost = mean_b dev(x_hat_{i->j}) - mean_b dev(x_j)`` (can be negative).

The distances are measured in the model's ``x`` (``space="x"``, the default) or in EDM's
``v = x / alpha`` (``space="v"``, the paper's own variables); for VE schedules (alpha = 1) the
two coincide. Costs ``i >= j`` are ``+inf``. The per-sample normalisation by ``sqrt(D)`` or
``D`` scales every cost alike, so the searched grid is that of the paper's unnormalised norms.

**Search.** With ``K`` student steps the path ``0 = j_0 < j_1 < ... < j_K = M-1`` minimises

    J = sum_{k=0}^{K-1} gamma^k cost[j_k, j_{k+1}]

(``gamma = 1.15`` in the paper: later, low-noise jumps weigh more). Dynamic programming from
the end: ``W_1(j) = cost[j, M-1]``, ``W_r(j) = min_{i > j} cost[j, i] + gamma W_{r-1}(i)``,
and ``J* = W_K(0)``; the path is read forward from the argmins (not by float equality).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from deis_jax.fitting.teacher import Teacher
from deis_jax.sampling.sde import NoiseSchedule

METRICS = ("l2", "l1", "dev")
SPACES = ("x", "v")
DEFAULT_GAMMA = 1.15


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_num_steps(num_steps, m: int) -> None:
    """``num_steps`` must be an integer in ``[1, M - 1]`` for a teacher grid of M points."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise ValueError(f"num_steps must be an integer in [1, {m - 1}], got {num_steps!r}")
    if not 1 <= num_steps <= m - 1:
        raise ValueError(
            f"num_steps must be in [1, {m - 1}] (M - 1 for a teacher grid of M = {m} points), "
            f"got {num_steps}"
        )


def check_gamma(gamma) -> float:
    """``gamma`` as a float, or ``ValueError`` unless it is a finite number > 0."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    return float(gamma)


def _rms(a: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(a * a, axis=-1))


def _line_deviation(y: np.ndarray, end: np.ndarray, u: np.ndarray) -> np.ndarray:
    """RMS over the last axis of the component of ``end - y`` orthogonal to the unit ``u``."""
    r = end - y
    return _rms(r - np.sum(r * u, axis=-1, keepdims=True) * u)


def jump_costs(
    teacher: Teacher,
    schedule: NoiseSchedule,
    metric: str = "l2",
    *,
    space: str = "x",
    max_elements: int = 1 << 24,
) -> np.ndarray:
    """The (M, M) float64 matrix of DDIM jump costs between the teacher's fine nodes.

    ``cost[i, j]`` (i < j) is the sample mean of the ``metric`` between the one-step jump from
    ``teacher.states[:, i]`` (with ``teacher.eps[:, i]``) to ``ts[j]`` and
    ``teacher.states[:, j]``, measured in ``space`` (see the module docstring); ``+inf`` for
    ``i >= j``. Samples are processed in chunks of about ``max_elements`` float64 numbers
    per working array, and the jumps from one node to all later nodes at once.
    """
    _check_choice("metric", metric, METRICS)
    _check_choice("space", space, SPACES)
    if teacher.states is None or teacher.eps is None:
        raise ValueError("jump_costs needs a teacher solved with keep_states=True")
    ts = np.asarray(teacher.ts, np.float64)
    m = ts.shape[0]
    n = teacher.states.shape[0]
    alpha = np.asarray(schedule.alpha(ts), np.float64)
    rho = np.asarray(schedule.rho(ts), np.float64)
    scale = np.ones(m) if space == "v" else alpha  # distances in x = alpha v, or in v
    states = teacher.states.reshape(n, m, -1)
    eps = teacher.eps.reshape(n, m - 1, -1)
    dim = states.shape[-1]
    chunk = max(1, max_elements // (m * dim))

    total = np.zeros((m, m))
    for start in range(0, n, chunk):
        v = np.asarray(states[start : start + chunk], np.float64) / alpha[None, :, None]
        e = np.asarray(eps[start : start + chunk], np.float64)
        y = v * scale[None, :, None]  # teacher states in the metric's space
        if metric == "dev":
            end = y[:, -1:]
            u = end - y[:, :1]
            u = u / np.linalg.norm(u, axis=-1, keepdims=True)
            dev_teacher = _line_deviation(y, end, u)  # (c, M)
        for i in range(m - 1):
            drho = (rho[i + 1 :] - rho[i])[None, :, None]
            jump = (v[:, i : i + 1] + drho * e[:, i : i + 1]) * scale[None, i + 1 :, None]
            if metric == "l2":
                per_sample = _rms(jump - y[:, i + 1 :])
            elif metric == "l1":
                per_sample = np.mean(np.abs(jump - y[:, i + 1 :]), axis=-1)
            else:
                per_sample = _line_deviation(jump, end, u) - dev_teacher[:, i + 1 :]
            total[i, i + 1 :] += per_sample.sum(axis=0)
    cost = total / n
    cost[np.tril_indices(m)] = np.inf
    return cost


def dp_path(cost, num_steps: int, gamma: float = DEFAULT_GAMMA) -> list[int]:
    """The node path ``0 = j_0 < ... < j_K = M-1`` with ``K = num_steps`` minimising
    ``sum_k gamma^k cost[j_k, j_{k+1}]`` (only ``cost[i, j]`` with ``i < j`` is read).

    Ties go to the smallest index. Raises ``ValueError`` unless ``1 <= num_steps <= M-1``.
    """
    cost = np.asarray(cost, np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] < 2:
        raise ValueError(f"cost must be a square (M, M) matrix with M >= 2, got {cost.shape}")
    m = cost.shape[0]
    check_num_steps(num_steps, m)
    gamma = check_gamma(gamma)
    upper = np.triu(np.ones((m, m), dtype=bool), k=1)
    if np.any(np.isnan(cost[upper])):
        raise ValueError("cost contains NaN above the diagonal")
    step = np.where(upper, cost, np.inf)

    # value[j] = W_r(j): best weighted cost from node j to M-1 in exactly r steps.
    value = np.full(m, np.inf)
    value[-1] = 0.0
    choices = []
    for _ in range(num_steps):
        total = step + gamma * value[None, :]
        choice = np.argmin(total, axis=1)
        value = total[np.arange(m), choice]
        choices.append(choice)
    if not np.isfinite(value[0]):
        raise ValueError("no finite-cost path: cost must be finite above the diagonal")
    path = [0]
    for choice in reversed(choices):
        path.append(int(choice[path[-1]]))
    return path


def gits_grid(
    teacher: Teacher,
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    metric: str = "l2",
    gamma: float = DEFAULT_GAMMA,
    space: str = "x",
) -> np.ndarray:
    """The GITS grid of ``num_steps`` steps: ``teacher.ts[dp_path(jump_costs(...))]``.

    A float64, strictly decreasing subset of the teacher's fine grid with exactly its
    endpoints, ready for ``make_plan(schedule, ts=grid, ...)`` with any method.
    """
    _check_choice("metric", metric, METRICS)
    _check_choice("space", space, SPACES)
    gamma = check_gamma(gamma)
    m = teacher.num_points
    check_num_steps(num_steps, m)
    cost = jump_costs(teacher, schedule, metric, space=space)
    path = dp_path(cost, num_steps, gamma)
    return np.asarray(teacher.ts, np.float64)[path]
