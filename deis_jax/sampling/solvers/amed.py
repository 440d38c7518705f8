"""AMED-Solver and AMED-Plugin (Zhou et al., CVPR 2024): learned intermediate times per sample.

Write ``v = x / alpha`` and ``rho = sigma / alpha`` (the EDM sigma); the probability-flow ODE
is ``dv/drho = eps``. One AMED step from grid point ``t_c`` to ``t_x`` (``rho_c > rho_x``)
evaluates the network at ``t_c`` and at an intermediate point ``s`` placed by a ratio
``r in (0, 1)`` in log-rho, the direction there scaled by ``a`` through the network's time:

    rho_s = rho_x^r rho_c^(1-r)                      (r = 1/2: the geometric midpoint)
    d_c   = eps(x_c, t_c)                            (AFS on the first step: x_T / sqrt(a^2+s^2))
    y     = v_c + (rho_s - rho_c) AB(d_c, history)   (the stage; AB = d_c unless iPNDM)
    d_s   = a eps(alpha(t') y, t'),  rho(t') = a rho_s  (the network sees a rho_s)

and the update, scaled by ``c`` (AMED's "mean direction" magnitude):

    amed        v_x = v_c + c (rho_x - rho_c) d_s                                   (Solver)
    amed_ddim   v_x = y + c (rho_x - rho_s) d_s                         (Plugin on Euler/DDIM)
    amed_dpm    v_x = v_c + c (rho_x - rho_c) [(1 - 1/(2r)) d_c + d_s / (2r)]   (on DPM-Solver-2)
    amed_ipndm  v_x = y + c (rho_x - rho_s) AB(d_s, history')                  (on iPNDM)

``AB`` is iPNDM's fixed Adams-Bashforth combination of the newest direction and the earlier
ones, over *every* evaluation (grid and intermediate points alike, as in the paper): weights
1; (3, -1)/2; (23, -16, 5)/12; (55, -59, 37, -9)/24, at order ``min(order + 1, e + 1)`` for
the e-th evaluation (warm start). ``r, c, a`` come per sample from a predictor
(``deis_jax.sampling.amed_predictor``) fed with the network's bottleneck feature at ``t_c``
(or, feature-free, one learned value per step); ``r = 1/2, c = a = 1`` is the base solver:
``amed`` and ``amed_dpm`` are then DPM-Solver-2 (``dpm2``) exactly. Each step costs 2 NFE,
``2 N - 1`` with AFS for N steps (NFE 3/5/7/9 = 2/3/4/5 steps with AFS).

In the step table (``deis_jax.sampling.solvers.table``, state ``x = alpha v``) a step is two
stages; the host table holds the base solver (``r = 1/2``) in float64 and :class:`AmedRule`
recomputes the row per sample on the device from the predictor's outputs, inside the one
sampling loop (``deis_jax.sampling.sampler.StepRule``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.sampling.coefficients import ADAMS_BASHFORTH
from deis_jax.sampling.sde import Array, NoiseSchedule, array_namespace
from deis_jax.sampling.solvers.registry import (
    MethodArgumentError,
    MethodSpec,
    register_method,
    two_per_step,
)
from deis_jax.sampling.solvers.table import StepTable, as_float, finish_table

AMED_METHODS = ("amed", "amed_ddim", "amed_dpm", "amed_ipndm")
PREDICTOR_KINDS = ("bottleneck", "stepwise")
AMED_OPTIONS = ("predictor", "scale_dir", "scale_time")
DEFAULT_OPTIONS = {"predictor": "bottleneck", "scale_dir": 0.01, "scale_time": 0.0}


def amed_options(options: dict[str, Any]) -> dict[str, Any]:
    """The AMED options with their defaults filled in."""
    return {**DEFAULT_OPTIONS, **options}


def check_amed_options(options, final_denoise: bool) -> None:
    """``predictor`` in ``PREDICTOR_KINDS``; ``scale_dir``/``scale_time`` in [0, 1)."""
    opts = amed_options(dict(options))
    if opts["predictor"] not in PREDICTOR_KINDS:
        raise MethodArgumentError(
            "options.predictor", f"must be one of {PREDICTOR_KINDS}, got {opts['predictor']!r}"
        )
    for name in ("scale_dir", "scale_time"):
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise MethodArgumentError(
                f"options.{name}", f"must be a number in [0, 1), got {value!r}"
            )


def ab_weights(num_steps: int, order: int) -> np.ndarray:
    """iPNDM's weights for both sub-steps of every step: ``(N, 2, order + 1)``; evaluation
    ``e = 2k + j`` (sub-step j of step k) uses order ``min(order, e)`` (warm start)."""
    w = np.zeros((num_steps, 2, order + 1))
    for k in range(num_steps):
        for j in range(2):
            q = min(order, 2 * k + j)
            w[k, j, : q + 1] = ADAMS_BASHFORTH[q]
    return w


def step_coefficients(
    schedule: NoiseSchedule,
    method: str,
    rho_c: Array,
    rho_x: Array,
    alpha_c: Array,
    alpha_x: Array,
    t_c: Array,
    r: Array,
    c: Array,
    a: Array,
    w_stage: Array,
    w_out: Array,
) -> StepTable:
    """One AMED step's table fields (module docstring), elementwise in every argument.

    Scalars (or arrays of one common shape ``P``: the steps on the host, the samples on the
    device) for ``rho_*``, ``alpha_*``, ``t_c``, ``r``, ``c``, ``a``; ``w_stage``/``w_out``:
    AB weights, leading axis the lag (shape ``(M, *P)``; ``[1]`` for the one-step methods).
    Every returned field has its table axes first and ``P`` last (``t``: ``(2, *P)``,
    ``stage_k``: ``(2, 2, *P)``, ``out_hist``: ``(H, *P)`` with ``H = M - 1``, ...).
    """
    xp = array_namespace(rho_c, rho_x, r, c, a, w_stage)
    log_rho_s = (1.0 - r) * xp.log(rho_c) + r * xp.log(rho_x)
    rho_s = xp.exp(log_rho_s)
    t_net = schedule.t_from_rho(a * rho_s)
    alpha_net = xp.exp(schedule.log_alpha(t_net))
    shape = xp.broadcast_shapes(*(xp.shape(v) for v in (rho_c, rho_x, r, c, a, t_c)))
    one, zero = xp.ones(shape), xp.zeros(shape)
    h_stage, h_rest, h_all = rho_s - rho_c, rho_x - rho_s, rho_x - rho_c
    num_hist = w_stage.shape[0] - 1
    stage_w = [alpha_net * h_stage * w_stage[j] for j in range(num_hist + 1)]
    hist = []  # v-space coefficients of the earlier directions (iPNDM only)
    if method == "amed":
        out = [zero, c * h_all]
    elif method == "amed_ddim":
        out = [h_stage, c * h_rest]
    elif method == "amed_dpm":
        out = [c * h_all * (1.0 - 0.5 / r), c * h_all * (0.5 / r)]
    elif method == "amed_ipndm":
        # y = v_c + h_stage sum_j w_stage[j] E_j (E_0 = d_c, E_j earlier directions) and
        # v_x = y + c h_rest (w_out[0] d_s + w_out[1] d_c + w_out[2] E_1 + ...)
        def w_rest(j):
            return c * h_rest * w_out[j] if j < w_out.shape[0] else zero

        out = [h_stage * w_stage[0] + w_rest(1), c * h_rest * w_out[0]]
        hist = [h_stage * w_stage[j + 1] + w_rest(j + 2) for j in range(num_hist)]
    else:
        raise ValueError(f"method must be one of {AMED_METHODS}, got {method!r}")

    def rows(values):  # stacked on a new leading axis, broadcast to ``shape`` (may be empty)
        return xp.stack([v * one for v in values]) if values else xp.zeros((0, *shape))

    return StepTable(
        t=rows([t_c, t_net]),
        stage_x=rows([one, alpha_net / alpha_c]),
        stage_k=xp.stack([rows([zero, zero]), rows([stage_w[0], zero])]),
        pred_x=rows([zero, zero]),
        pred_eps=rows([one, a]),
        out_x=alpha_x / alpha_c * one,
        out_k=rows([alpha_x * v for v in out]),
        out_hist=rows([alpha_x * v for v in hist]),
        out_noise=zero,
        stage_hist=xp.stack([rows([zero] * num_hist), rows(stage_w[1:])]),
        stage_noise=rows([zero, zero]),
    )


def _grid_values(schedule: NoiseSchedule, ts: Array):
    """``(rho, alpha)`` at the grid points, in ``ts``' namespace (float64 on the host)."""
    xp = array_namespace(ts)
    ts = as_float(ts, xp)
    return as_float(schedule.rho(ts), xp), xp.exp(as_float(schedule.log_alpha(ts), xp))


def _weights(method: str, num_steps: int, order: int) -> np.ndarray:
    if method == "amed_ipndm":
        return ab_weights(num_steps, order)
    return np.ones((num_steps, 2, 1))


def _builder(method: str):
    def build(schedule, ts, order: int = 2, **options) -> StepTable:
        """The base solver's table (``r = 1/2``, ``c = a = 1``) on ``ts``."""
        xp = array_namespace(ts)
        ts = as_float(ts, xp)
        rho, alpha = _grid_values(schedule, ts)
        n = ts.shape[0] - 1
        w = xp.asarray(np.moveaxis(_weights(method, n, order), 0, -1))  # (2, M, N)
        half = xp.full((n,), 0.5)
        table = step_coefficients(schedule, method, rho[:-1], rho[1:], alpha[:-1], alpha[1:],
                                  ts[:-1], half, xp.ones(n), xp.ones(n), w[0], w[1])  # fmt: skip
        table = StepTable(*(xp.moveaxis(f, -1, 0) for f in table))
        return finish_table(table, xp)

    build.__name__ = f"build_{method}"
    return build


@dataclasses.dataclass(frozen=True, eq=False)
class AmedRule:
    """The device side of an AMED method (``deis_jax.sampling.sampler.StepRule``).

    Holds the grid values (float64 on the host, cast to the working dtype), the AB weights and
    the predictor module; ``params`` are the predictor's. Per step it calls the predictor on
    the bottleneck feature (``features``; zeros on an AFS step) and the step's two noise
    levels, and returns the row of :func:`step_coefficients` for the per-sample ``r, c, a``.
    """

    method: str
    schedule: NoiseSchedule
    rho: np.ndarray
    alpha: np.ndarray
    weights: np.ndarray  # (N, 2, M)
    predictor: Any  # a flax module: (features, rho_cur, rho_next, step) -> (r, c, a)
    options: dict  # the AMED options, defaults filled in (``amed_options``)

    @property
    def needs_features(self) -> bool:
        return not hasattr(self.predictor, "num_steps")

    def __call__(self, params, row: StepTable, step, x: jax.Array, features) -> StepTable:
        dtype = x.dtype
        rho, alpha = (jnp.asarray(v, dtype) for v in (self.rho, self.alpha))
        feats = features if features is not None else jnp.zeros((x.shape[0], 1), dtype)
        r, c, a = (v.astype(dtype) for v in self.predictor.apply(
            {"params": params}, feats.astype(dtype), rho[step], rho[step + 1], step))  # fmt: skip
        w = jnp.asarray(self.weights, dtype)[step]  # (2, M)
        row = step_coefficients(self.schedule, self.method, rho[step], rho[step + 1],
                                 alpha[step], alpha[step + 1], row.t[0], r, c, a, w[0],
                                 w[1])  # fmt: skip
        return jax.tree.map(lambda f: f.astype(dtype), row)


def _rule(method: str):
    def make(schedule, ts, order: int = 2, **options) -> AmedRule:
        from deis_jax.sampling.amed_predictor import AmedPredictor, StepwisePredictor

        opts = amed_options(options)
        ts = np.asarray(ts, np.float64)
        rho, alpha = _grid_values(schedule, ts)
        n = ts.shape[0] - 1
        heads = {"scale_dir": float(opts["scale_dir"]), "scale_time": float(opts["scale_time"])}
        if opts["predictor"] == "stepwise":
            predictor = StepwisePredictor(num_steps=n, **heads)
        else:
            predictor = AmedPredictor(**heads)
        return AmedRule(method, schedule, rho, alpha, _weights(method, n, order), predictor,
                        opts)  # fmt: skip

    return make


for _method, _orders, _default, _grid in (
    ("amed", (2,), 2, "linear"),
    ("amed_ddim", (1,), 1, "karras"),
    ("amed_dpm", (2,), 2, "karras"),
    ("amed_ipndm", (0, 1, 2, 3), 3, "karras"),
):
    register_method(
        MethodSpec(
            _method,
            _builder(_method),
            _orders,
            _default,
            stages=two_per_step,
            default_grid=_grid,
            options=AMED_OPTIONS,
            options_check=check_amed_options,
            rule=_rule(_method),
        )  # fmt: skip
    )
