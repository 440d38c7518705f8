"""Deterministic exponential-integrator samplers of the probability-flow ODE.

All solve ``dv/drho = eps(alpha v, t(rho))`` (``v = x/alpha``, ``rho = sigma/alpha``) with the
linear part integrated exactly; see ``deis_jax.sampling.coefficients`` for the formulas.

``ddim``   order 0: ``x_{k+1} = psi_k x_k + (sigma_{k+1} - psi_k sigma_k) eps_k``
           (Euler in rho; tAB-0 = rhoAB-0 = rhoRK-Euler = DDIM).
``tab``    tAB-DEIS, order r in 0..3: eps extrapolated by the Lagrange polynomial in t through
           ``eps_k, ..., eps_{k-r}``, coefficients integrated exactly; global order r + 1.
``rhoab``  rhoAB-DEIS: the same with the polynomial in rho (classical Adams-Bashforth in rho
           with variable steps; on a uniform rho grid the weights are the textbook AB ones).
``ipndm``  improved PNDM: the DDIM coefficient times fixed uniform-step AB weights
           (``(55, -59, 37, -9)/24`` at order 3), on any grid.
``rhork``  rhoRK-DEIS: explicit Runge-Kutta in rho with stages at off-grid times
           ``t(rho_k + c_s h)``; ``order`` 1..4 picks Euler / Heun / Kutta-3 / RK4 unless
           ``tableau`` names one of ``deis_jax.sampling.coefficients.RK_TABLEAUS``.

Multistep methods warm up with lower orders on the history they have (no extra NFE), so they
spend exactly N NFE for N steps; rhoRK spends S per step.

Every builder is a pure array function of the grid: a numpy ``ts`` gives a numpy float64
table, a JAX ``ts`` (under ``jax_enable_x64``, traceable and differentiable) a ``jax.numpy``
one.
"""

from __future__ import annotations

from deis_jax.sampling import coefficients as coef
from deis_jax.sampling.sde import array_namespace
from deis_jax.sampling.solvers.registry import MethodSpec, register_method
from deis_jax.sampling.solvers.table import (
    StepTable,
    as_float,
    eps_prediction,
    finish_table,
    multistep_table,
)


def build_ddim(schedule, ts, order: int = 0) -> StepTable:
    """DDIM table: the order-0 exponential integrator."""
    psi, c = coef.ddim_coefficients(schedule, ts)
    return multistep_table(ts, psi, c[:, None])


def _polynomial_builder(basis: str):
    def build(schedule, ts, order: int, quadrature_nodes: int = coef.DEFAULT_QUADRATURE_NODES):
        psi, _ = coef.ddim_coefficients(schedule, ts)
        c = coef.polynomial_eps_coefficients(schedule, ts, order, basis, quadrature_nodes)
        return multistep_table(ts, psi, c)

    return build


def build_ipndm(schedule, ts, order: int = 3) -> StepTable:
    """iPNDM table: uniform-step Adams-Bashforth weights on any grid."""
    psi, _ = coef.ddim_coefficients(schedule, ts)
    return multistep_table(ts, psi, coef.adams_bashforth_eps_coefficients(schedule, ts, order))


def rk_tableau_name(order: int, options: dict) -> str:
    """The ``tableau`` option, else the default tableau of ``order``."""
    return options.get("tableau") or coef.RK_DEFAULT_BY_ORDER[order]


def build_rhork(schedule, ts, order: int = 2, tableau: str | None = None) -> StepTable:
    """rhoRK-DEIS table: an explicit Runge-Kutta tableau applied in rho."""
    name = rk_tableau_name(order, {"tableau": tableau})
    xp = array_namespace(ts)
    ts = as_float(ts, xp)
    stage_t, stage_x, stage_k, psi, out_k = coef.rk_rho_coefficients(schedule, ts, name)
    n, s = stage_t.shape
    pred_x, pred_eps = eps_prediction(n, s, xp)
    table = StepTable(
        t=stage_t,
        stage_x=stage_x,
        stage_k=stage_k,
        pred_x=pred_x,
        pred_eps=pred_eps,
        out_x=psi,
        out_k=out_k,
        out_hist=xp.zeros((n, 0)),
        out_noise=xp.zeros(n),
        stage_hist=xp.zeros((n, s, 0)),
        stage_noise=xp.zeros((n, s)),
    )
    return finish_table(table, xp)


def _rk_stages(order: int, options: dict) -> int:
    return len(coef.rk_tableau(rk_tableau_name(order, options))[0])


# DDIM, the order-0 exponential integrator.
register_method(MethodSpec("ddim", build_ddim, (0,), 0))
# tAB-DEIS: Adams-Bashforth with eps extrapolated in t.
register_method(
    MethodSpec("tab", _polynomial_builder("t"), (0, 1, 2, 3), 3, options=("quadrature_nodes",))
)
# rhoAB-DEIS: Adams-Bashforth in rho.
register_method(
    MethodSpec("rhoab", _polynomial_builder("rho"), (0, 1, 2, 3), 3, options=("quadrature_nodes",))
)
# iPNDM: fixed uniform-step AB weights on any grid.
register_method(MethodSpec("ipndm", build_ipndm, (0, 1, 2, 3), 3))
# rhoRK-DEIS: explicit Runge-Kutta in rho.
register_method(
    MethodSpec("rhork", build_rhork, (1, 2, 3, 4), 2, stages=_rk_stages, options=("tableau",))
)
