"""Host-side exponential-integrator coefficients, exact in float64.

Conventions (``deis_jax.sampling.sde``): ``alpha`` is the mean coefficient,
``rho = sigma/alpha``. On the grid ``t_0 = T > t_1 > ... > t_N`` step k maps
``t_k -> t_{k+1}``; ``eps_k = eps(x_k, t_k)``.

With ``v = x / alpha`` the probability-flow ODE is ``dv/drho = eps(x, t(rho))``, so the exact
variation-of-constants step is

    x_{k+1} = psi_k x_k + alpha_{k+1} * int_{rho_k}^{rho_{k+1}} eps(x(rho), t(rho)) d rho,
    psi_k = alpha_{k+1} / alpha_k.

Replacing eps by the Lagrange polynomial through the last q + 1 values gives the DEIS
coefficients ``C_{k,j} = alpha_{k+1} int_{rho_k}^{rho_{k+1}} l_{k,j}(u(rho)) d rho``, where the
basis variable is ``u = t`` (tAB-DEIS) or ``u = rho`` (rhoAB-DEIS). The integrand is smooth
in rho (in t it behaves like t^{-1/2} near 0), so the integral is computed by Gauss-Legendre
quadrature in rho: exact for rhoAB (a polynomial), and converged to float64 precision for tAB.
The official implementation uses a 10^4-point left Riemann sum in t, which is biased by
~1e-4 relative; this is the main correctness fix over it.

All functions are pure array functions of the grid. They run in numpy float64 on the host;
called with JAX arrays under ``jax_enable_x64`` they trace and are differentiable in ``ts``
(the node/weight tables are constants).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from deis_jax.sampling.sde import NoiseSchedule, array_namespace

DEFAULT_QUADRATURE_NODES = 64

# Classical Adams-Bashforth weights for a uniform step, most recent value first.
ADAMS_BASHFORTH = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


@functools.cache
def gauss_legendre(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(num_nodes)
    return 0.5 * (x + 1.0), 0.5 * w


def lagrange_basis(u, nodes):
    """``l_j(u) = prod_{m != j} (u - nodes_m) / (nodes_j - nodes_m)``, stacked on a last axis.

    ``nodes`` has shape ``(q + 1,)`` (any ``u``), or ``(..., q + 1)`` for a batch of node sets
    whose leading axes broadcast against the leading axes of ``u`` (shape ``(..., M)``).
    """
    xp = array_namespace(u, nodes)
    q1 = nodes.shape[-1]
    node = [nodes[m] if nodes.ndim == 1 else nodes[..., m, None] for m in range(q1)]
    diff = [u - node[m] for m in range(q1)]
    cols = []
    for j in range(q1):
        val = xp.ones_like(u)
        for m in range(q1):
            if m != j:
                val = val * diff[m] / (node[j] - node[m])
        cols.append(val)
    return xp.stack(cols, axis=-1)


def take_rows(x, idx: np.ndarray):
    """``x[idx]`` for a static, non-negative integer index array, built from slices of the
    contiguous runs of ``idx`` (traced, a slice differentiates to a pad, where a gather would
    differentiate to a scatter, which is slow to compile)."""
    idx = np.asarray(idx)
    if idx.size and idx.min() < 0:
        raise ValueError(f"take_rows needs non-negative indices, got {idx}")
    runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1)
    parts = [x[run[0] : run[-1] + 1] for run in runs if run.size]
    if len(parts) == 1:
        return parts[0]
    return array_namespace(x).concatenate(parts) if parts else x[:0]


def rows_by_order(xp, orders, rows_of: Callable[[Callable, int], tuple]) -> tuple:
    """Per-step arrays computed one order at a time, vectorised over the steps of that order.

    ``rows_of(take, q)`` computes the rows of the steps k whose order is ``q``, reading the
    grid quantities through ``take(x, shift=0) = x[k + shift]`` (stacked over those k), and
    returns a tuple of arrays with one row per such step. The groups are put back in step
    order. All indices are static (slices), so traced, the graph has a size independent of the
    number of steps, and each step reads only its own, valid, history.
    """
    orders = np.asarray(orders)
    groups, steps = [], []
    for q in np.unique(orders):
        ks = np.flatnonzero(orders == q)

        def take(x, shift: int = 0, ks=ks):
            return take_rows(x, ks + shift)

        groups.append(rows_of(take, int(q)))
        steps.append(ks)
    perm = np.argsort(np.concatenate(steps))
    return tuple(take_rows(xp.concatenate(parts), perm) for parts in zip(*groups, strict=True))


def ddim_coefficients(schedule: NoiseSchedule, ts):
    """``(psi_k, c_k)`` of DDIM, the order-0 exponential integrator.

    ``x_{k+1} = psi_k x_k + c_k eps_k`` with ``psi_k = alpha_{k+1}/alpha_k`` and
    ``c_k = sigma_{k+1} - psi_k sigma_k = alpha_{k+1} (rho_{k+1} - rho_k)``.
    """
    xp = array_namespace(ts)
    log_a = schedule.log_alpha(ts)
    rho = schedule.rho(ts)
    psi = xp.exp(log_a[1:] - log_a[:-1])
    return psi, xp.exp(log_a[1:]) * (rho[1:] - rho[:-1])


def polynomial_eps_coefficients(
    schedule: NoiseSchedule,
    ts,
    order: int,
    basis: str = "t",
    num_nodes: int = DEFAULT_QUADRATURE_NODES,
):
    """DEIS multistep coefficients ``C`` of shape ``(N, order + 1)``.

    Row k multiplies ``(eps_k, eps_{k-1}, ..., eps_{k-order})``; it uses degree
    ``q = min(k, order)`` (warm start on the available history, no extra NFE) and the unused
    slots are exactly 0. ``basis`` is ``"t"`` (tAB) or ``"rho"`` (rhoAB). Each row sums to
    the DDIM coefficient (the Lagrange basis is a partition of unity).
    """
    if basis not in ("t", "rho"):
        raise ValueError(f"basis must be 't' or 'rho', got {basis!r}")
    xp = array_namespace(ts)
    nodes01, weights01 = gauss_legendre(num_nodes)
    rho = schedule.rho(ts)
    alpha_next = schedule.alpha(ts[1:])
    knots = ts if basis == "t" else rho
    num_steps = ts.shape[0] - 1

    def rows_of(take: Callable, q: int) -> tuple:
        h = take(rho, 1) - take(rho)
        rho_nodes = take(rho)[:, None] + h[:, None] * nodes01  # (G, M)
        u = schedule.t_from_rho(rho_nodes) if basis == "t" else rho_nodes
        nodes = xp.stack([take(knots, -j) for j in range(q + 1)], axis=-1)  # k, k-1, ..., k-q
        basis_vals = lagrange_basis(u, nodes)  # (G, M, q + 1)
        integral = (take(alpha_next) * h)[:, None] * (weights01 @ basis_vals)
        return (xp.concatenate([integral, xp.zeros((h.shape[0], order - q))], axis=1),)

    orders = [min(k, order) for k in range(num_steps)]
    return rows_by_order(xp, orders, rows_of)[0]


def adams_bashforth_eps_coefficients(schedule: NoiseSchedule, ts, order: int):
    """iPNDM: the DDIM coefficient times the fixed uniform-step AB weights.

    ``C_{k,j} = c_k^DDIM * w_{q,j}`` with ``q = min(k, order)``: exact only on a uniform rho
    grid, where it coincides with rhoAB.
    """
    xp = array_namespace(ts)
    _, c = ddim_coefficients(schedule, ts)
    w = np.zeros((ts.shape[0] - 1, order + 1))
    for k in range(w.shape[0]):
        q = min(k, order)
        w[k, : q + 1] = ADAMS_BASHFORTH[q]
    return c[:, None] * xp.asarray(w)


# --- explicit Runge-Kutta tableaus (c, A, b) ----------------------------------------------
RK_TABLEAUS: dict[str, tuple[tuple, tuple, tuple]] = {
    "euler": ((0.0,), ((),), (1.0,)),
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "kutta3": ((0.0, 0.5, 1.0), ((), (0.5,), (-1.0, 2.0)), (1 / 6, 2 / 3, 1 / 6)),
    "ralston3": ((0.0, 0.5, 0.75), ((), (0.5,), (0.0, 0.75)), (2 / 9, 1 / 3, 4 / 9)),
    "heun3": ((0.0, 1 / 3, 2 / 3), ((), (1 / 3,), (0.0, 2 / 3)), (0.25, 0.0, 0.75)),
    "vdh3": ((0.0, 8 / 15, 2 / 3), ((), (8 / 15,), (0.25, 5 / 12)), (0.25, 0.0, 0.75)),
    "ssprk3": ((0.0, 1.0, 0.5), ((), (1.0,), (0.25, 0.25)), (1 / 6, 1 / 6, 2 / 3)),
    "rk4": (
        (0.0, 0.5, 0.5, 1.0),
        ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        (1 / 6, 1 / 3, 1 / 3, 1 / 6),
    ),
}
# Names used by the official DEIS code.
RK_ALIASES = {
    "1euler": "euler",
    "2heun": "heun",
    "3kutta": "kutta3",
    "3ral": "ralston3",
    "3heun": "heun3",
    "3vdh": "vdh3",
    "3ssprk": "ssprk3",
    "4rk": "rk4",
}
RK_DEFAULT_BY_ORDER = {1: "euler", 2: "heun", 3: "kutta3", 4: "rk4"}


def rk_tableau(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(c, A, b)`` as float64 arrays for a tableau name or DEIS alias."""
    key = RK_ALIASES.get(name, name)
    if key not in RK_TABLEAUS:
        allowed = tuple(RK_TABLEAUS) + tuple(RK_ALIASES)
        raise ValueError(f"Runge-Kutta tableau must be one of {allowed}, got {name!r}")
    c, rows, b = RK_TABLEAUS[key]
    s = len(c)
    a = np.zeros((s, s))
    for i, row in enumerate(rows):
        a[i, : len(row)] = row
    return np.asarray(c), a, np.asarray(b)


def rk_rho_coefficients(schedule: NoiseSchedule, ts, tableau: str):
    """Explicit RK on ``dv/drho = eps`` written in x-space (rhoRK-DEIS).

    With ``h = rho_{k+1} - rho_k`` and stage times ``t_{k,s} = t(rho_k + c_s h)``:

        X_s     = (alpha_{k,s}/alpha_k) x_k + alpha_{k,s} h sum_l a_{sl} K_l,
        K_s     = eps(X_s, t_{k,s}),
        x_{k+1} = psi_k x_k + alpha_{k+1} h sum_s b_s K_s.

    Returns ``stage_t (N,S)``, ``stage_x (N,S)``, ``stage_k (N,S,S)``, ``psi (N,)``,
    ``out_k (N,S)``.
    """
    xp = array_namespace(ts)
    c, a, b = rk_tableau(tableau)
    rho = schedule.rho(ts)
    h = rho[1:] - rho[:-1]
    stage_rho = rho[:-1, None] + h[:, None] * c[None, :]
    # Pin stages with c = 0 (c = 1) to the grid point itself, avoiding a rho round trip.
    stage_t = xp.where(c[None, :] == 0.0, ts[:-1, None], schedule.t_from_rho(stage_rho))
    stage_t = xp.where(c[None, :] == 1.0, ts[1:, None], stage_t)
    log_a = schedule.log_alpha(ts)
    stage_log_a = schedule.log_alpha(stage_t)
    stage_x = xp.exp(stage_log_a - log_a[:-1, None])
    stage_k = xp.exp(stage_log_a)[:, :, None] * h[:, None, None] * a[None]
    psi = xp.exp(log_a[1:] - log_a[:-1])
    out_k = xp.exp(log_a[1:])[:, None] * h[:, None] * b[None, :]
    return stage_t, stage_x, stage_k, psi, out_k
