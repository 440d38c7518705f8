"""EPD-Solver, EPD-Plugin and AdaSDE: learned parallel probes, one "probe-combine" step rule.

Write ``v = x / alpha`` and ``rho = sigma / alpha`` (the EDM sigma): the probability-flow ODE
is ``dv/drho = eps``. Step n maps ``rho_n -> rho_{n+1}`` (``h = rho_{n+1} - rho_hat < 0``)
with K probes (``probes``) per step, each with a position ``r``, a simplex weight ``w``, a
direction scale ``c`` and a noise-level scale ``a`` (EPD, Zhu et al., ICCV 2025), and for
AdaSDE (Wang et al., NeurIPS 2025) a churn ``gamma`` (``gamma_bar = sum_k w_k gamma_k``, 0
at n = 0):

    rho_hat = (1 + gamma_bar) rho_n,   v_hat = v_n + sqrt(rho_hat^2 - rho_n^2) z_n   (churn)
    d_hat   = eps(v_hat at rho_hat)                      (AFS at n = 0: x_T / sqrt(a^2+s^2))
    tau_k   = rho_hat^(1 - r_k) rho_{n+1}^(r_k)          (r: a fraction of the step in log rho)
    y_k     = v_hat + (tau_k - rho_hat) P_n              (the probe's Euler predictor)
    g_k     = a_k eps(y_k at a_k tau_k)                  (all K probes: ONE network call)
    v_{n+1} = v_hat + h sum_k w_k c_k g_k

``P_n = d_hat`` for ``epd`` and ``adasde``; for ``epd_ipndm`` (the plugin on iPNDM) it is
iPNDM's Adams-Bashforth combination of the first-stage directions d_n, d_{n-1}, ... (weights
1; (3, -1)/2; (23, -16, 5)/12; (55, -59, 37, -9)/24 at order ``min(order, n)``, the probes
never enter it): the multistep formula only places the probes, the step is EPD's. ``g``
divides by the *unscaled* tau, so in eps form it is ``a eps(., a tau)``; the network sees
``a tau``. Where the schedule's ``t(rho)`` ends (``NoiseSchedule.rho_limit``: a discrete
DDPM table, the cosine schedule) the network's levels are capped there, ``a <- min(a,
max(rho_limit / tau, 1))`` and ``gamma_bar <- min(gamma_bar, rho_limit / rho_n - 1)``, so a
learned ``a > 1`` near the grid's start never asks for a time past ``t_max`` (spec §4); on
the other schedules the closed forms go on and nothing is capped. The churn noise ``z_n`` is
the sampler's per-sample noise ``fold_in(fold_in(key, i), n)``, so samples do not depend on
the batch size or devices.

**Parameters** are raw ``[N, K]`` tables (N steps) mapped inside the jitted step, so sampling
and fitting run the same code: ``r = sigmoid``, ``w = softmax`` over the probes,
``c = 1 + scale_dir tanh(raw / s)``, ``a = 1 + scale_time tanh(raw / s)`` with ``s = 4`` (EPD)
or 2 (AdaSDE), ``gamma = gamma_min + (gamma_max - gamma_min) sigmoid((raw + b) / 2)`` with
``gamma_min = 2e-4``, ``b = 2 logit(0.6)`` (``gamma_max = 0``: gamma = 0, the ODE). The
*neutral* parameters put the probes at the K-point Gauss-Legendre nodes of the step with
its weights (K = 1: ``r = 1/2``, ``w = 1``), ``c = a = 1``: EPD with K = 1 is then AMED-Solver
at ``r = 1/2`` (DPM-Solver-2 in log rho) exactly; AdaSDE's neutral gamma is 1% of its range
above gamma_min. The plan's table (``sample`` without parameters) is the neutral rule with
``gamma = 0``: the deterministic base step.

**Cost.** Each step is ``1 + K`` network evaluations in 2 sequential rounds:
``plan.nfe = (1 + K) N - afs`` real evaluations per sample, ``plan.parallel_nfe = 2 N - afs``
(the papers' "NFE"; EPD at K = 2 spends 5/8/11/14 real evaluations at parallel NFE 3/5/7/9).
In the step table (``deis_jax.sampling.solvers.table``, state ``x = alpha v``) a step has
``1 + K`` stages whose probes read only the first stage and the history, run by the sampler's
loop as one call on the ``K B`` concatenated probes (``TableStructure.parallel``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.sampling.coefficients import ADAMS_BASHFORTH
from deis_jax.sampling.sde import NoiseSchedule, array_namespace
from deis_jax.sampling.solvers.registry import (
    MethodArgumentError,
    MethodSpec,
    register_method,
    two_per_step,
)
from deis_jax.sampling.solvers.table import StepTable, as_float, finish_table

PROBE_METHODS = ("epd", "epd_ipndm", "adasde")
PROBE_OPTIONS = ("probes", "scale_dir", "scale_time", "gamma_max")
# The released runs' values (spec epd_adasde.md 1.5, 2.4): K = 2 for EPD, 1 for AdaSDE.
DEFAULTS = {
    "epd": {"probes": 2, "scale_dir": 0.05, "scale_time": 0.05},
    "epd_ipndm": {"probes": 2, "scale_dir": 0.05, "scale_time": 0.05},
    "adasde": {"probes": 1, "scale_dir": 0.05, "scale_time": 0.2, "gamma_max": 0.01},
}
TANH_DIVISOR = {"epd": 4.0, "epd_ipndm": 4.0, "adasde": 2.0}
GAMMA_MIN = 2e-4
GAMMA_SHIFT = 2.0 * math.log(0.6 / 0.4)  # raw = 0 is 60% of gamma's range
INITS = ("neutral", "normal")


def probe_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``method``'s defaults filled in."""
    return {**DEFAULTS[method], **options}


def _options_check(method: str):
    def check(options, final_denoise: bool) -> None:
        """``probes`` a positive int; ``scale_dir``/``scale_time`` in [0, 1); AdaSDE's
        ``gamma_max`` 0 or in [GAMMA_MIN, 1)."""
        opts = probe_options(method, dict(options))
        if "gamma_max" in options and method != "adasde":
            raise MethodArgumentError("options.gamma_max", f"is AdaSDE's, not {method!r}'s")
        k = opts["probes"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 8:
            raise MethodArgumentError("options.probes", f"must be an int in [1, 8], got {k!r}")
        for name in ("scale_dir", "scale_time"):
            value = opts[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise MethodArgumentError(
                    f"options.{name}", f"must be a number in [0, 1), got {value!r}"
                )
        if method == "adasde":
            g = opts["gamma_max"]
            ok = isinstance(g, int | float) and not isinstance(g, bool)
            if not ok or not (g == 0 or GAMMA_MIN <= g < 1):
                raise MethodArgumentError(
                    "options.gamma_max", f"must be 0 (no churn) or in [{GAMMA_MIN}, 1), got {g!r}"
                )

    return check


def _history(method: str, order: int, probes: int) -> int:
    """Ring slots of the carried first-stage directions (the probes' outputs sit between)."""
    return order * (probes + 1) if method == "epd_ipndm" else 0


def ab_rows(method: str, num_steps: int, order: int) -> np.ndarray:
    """``(N, order + 1)``: the probe predictor's weights of ``d_n, d_{n-1}, ...`` per step."""
    w = np.zeros((num_steps, order + 1))
    for n in range(num_steps):
        q = min(order, n) if method == "epd_ipndm" else 0
        w[n, : q + 1] = ADAMS_BASHFORTH[q]
    return w


def constrained(method: str, options: dict[str, Any], raw: dict[str, Any], xp=jnp):
    """``(r, w, c, a, gamma)`` from the raw tables (any leading shape, probes last); gamma is
    None for the ODE methods (and AdaSDE with ``gamma_max = 0``: zeros)."""
    div = TANH_DIVISOR[method]
    sigmoid = (lambda v: 1.0 / (1.0 + xp.exp(-v))) if xp is np else jax.nn.sigmoid
    r = sigmoid(raw["r"])
    logits = raw["w"] - xp.max(raw["w"], axis=-1, keepdims=True)
    w = xp.exp(logits) / xp.sum(xp.exp(logits), axis=-1, keepdims=True)
    c = 1.0 + options["scale_dir"] * xp.tanh(raw["c"] / div)
    a = 1.0 + options["scale_time"] * xp.tanh(raw["a"] / div)
    gamma = None
    if method == "adasde":
        g_max = options["gamma_max"]
        spread = sigmoid((raw["gamma"] + GAMMA_SHIFT) / 2.0)
        gamma = (GAMMA_MIN + (g_max - GAMMA_MIN) * spread) if g_max else 0.0 * raw["gamma"]
    return r, w, c, a, gamma


def probe_row(
    schedule: NoiseSchedule,
    rho_c,
    rho_x,
    alpha_c,
    alpha_x,
    t_c,
    r,
    w,
    c,
    a,
    gamma_bar,
    ab,
    history: int,
) -> StepTable:
    """One step's table row (module docstring) for probes ``r, w, c, a`` (shape ``(K,)``),
    the churn ``gamma_bar`` (a scalar; None: no churn) and the predictor weights ``ab``
    (``(q + 1,)``); host (numpy float64) or device (``jax.numpy``) alike."""
    xp = array_namespace(r, w, c, a, ab)
    k = r.shape[0]
    limit = schedule.rho_limit  # the network's noise levels are capped there (docstring)
    if gamma_bar is None:
        rho_hat, t_hat, alpha_hat, spread = rho_c, t_c, alpha_c, 0.0 * rho_c
    else:
        if math.isfinite(limit):
            gamma_bar = xp.minimum(gamma_bar, xp.maximum(limit / rho_c - 1.0, 0.0))
        rho_hat = (1.0 + gamma_bar) * rho_c
        t_hat = xp.where(gamma_bar == 0, t_c, schedule.t_from_rho(rho_hat))
        alpha_hat = xp.exp(schedule.log_alpha(t_hat))
        spread = rho_c * xp.sqrt(gamma_bar * (2.0 + gamma_bar))  # sqrt(rho_hat^2 - rho_c^2)
    tau = xp.exp((1.0 - r) * xp.log(rho_hat) + r * xp.log(rho_x))
    if math.isfinite(limit):
        a = xp.minimum(a, xp.maximum(limit / tau, 1.0))
    t_net = schedule.t_from_rho(a * tau)
    alpha_net = xp.exp(schedule.log_alpha(t_net))
    lead = alpha_net * (tau - rho_hat)  # (K,): the probes' coefficient of P_n
    zero = xp.zeros((1,))
    stage_k = xp.zeros((k + 1, k + 1))
    stage_hist = xp.zeros((k + 1, history))
    if xp is np:
        stage_k[1:, 0] = lead * ab[0]
        for i in range(1, ab.shape[0]):
            stage_hist[1:, i * (k + 1) - 1] = lead * ab[i]
    else:
        stage_k = stage_k.at[1:, 0].set(lead * ab[0])
        for i in range(1, ab.shape[0]):
            stage_hist = stage_hist.at[1:, i * (k + 1) - 1].set(lead * ab[i])
    return StepTable(
        t=xp.concatenate([xp.reshape(t_hat, (1,)), t_net]),
        stage_x=xp.concatenate([xp.reshape(alpha_hat / alpha_c, (1,)), alpha_net / alpha_c]),
        stage_k=stage_k,
        pred_x=xp.zeros((k + 1,)),
        pred_eps=xp.concatenate([xp.ones((1,)), a]),
        out_x=alpha_x / alpha_c,
        out_k=xp.concatenate([zero, alpha_x * (rho_x - rho_hat) * w * c]),
        out_hist=xp.zeros((history,)),
        out_noise=alpha_x * spread,
        stage_hist=stage_hist,
        stage_noise=xp.concatenate([xp.reshape(alpha_hat * spread, (1,)), alpha_net * spread]),
    )


def neutral_raw(method: str, num_steps: int, probes: int) -> dict[str, np.ndarray]:
    """The neutral raw tables (module docstring): Gauss-Legendre probes, ``c = a = 1``."""
    nodes, weights = np.polynomial.legendre.leggauss(probes)
    r = (nodes + 1.0) / 2.0
    row = {"r": np.log(r / (1.0 - r)), "w": np.log(weights / 2.0), "c": np.zeros(probes),
           "a": np.zeros(probes)}  # fmt: skip
    if method == "adasde":
        row["gamma"] = np.full(probes, 2.0 * math.log(0.01 / 0.99) - GAMMA_SHIFT)
    return {name: np.tile(v, (num_steps, 1)).astype(np.float32) for name, v in row.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class ProbeRule:
    """The device side of ``epd``/``epd_ipndm``/``adasde`` (``sampling.sampler.StepRule``):
    per step, the row of :func:`probe_row` for the step's row of each learned raw table
    (``params``: a dict of ``[N, K]`` arrays, :meth:`init_params`). Needs no features, so
    the sampler calls it before the step's first stage (the churn changes that stage)."""

    method: str
    schedule: NoiseSchedule
    ts: np.ndarray
    rho: np.ndarray
    alpha: np.ndarray
    ab: np.ndarray  # (N, q + 1)
    options: dict  # defaults filled in (probe_options)
    history: int

    needs_features = False
    parallel = True

    @property
    def stochastic(self) -> bool:
        return self.method == "adasde"

    @property
    def num_steps(self) -> int:
        return int(self.ts.shape[0]) - 1

    @property
    def probes(self) -> int:
        return int(self.options["probes"])

    def init_params(self, seed: int = 0, init: str = "neutral") -> dict[str, jax.Array]:
        """Raw tables: ``neutral`` (the base step, module docstring) or ``normal`` (the
        papers' i.i.d. N(0, 1) draw, keyed by ``seed``)."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        raw = neutral_raw(self.method, self.num_steps, self.probes)
        if init == "normal":
            keys = jax.random.split(jax.random.PRNGKey(seed), len(raw))
            return {name: jax.random.normal(key, v.shape, jnp.float32)
                    for key, (name, v) in zip(keys, sorted(raw.items()), strict=True)}  # fmt: skip
        return {name: jnp.asarray(v) for name, v in raw.items()}

    def settings(self) -> dict[str, Any]:
        """What the learned tables' shapes depend on (kept in the predictor file)."""
        return {"kind": "probe", "num_steps": self.num_steps, "probes": self.probes}

    def __call__(self, params, row: StepTable, step, x: jax.Array, features) -> StepTable:
        dtype = x.dtype
        rho, alpha, ts, ab = (jnp.asarray(v, dtype) for v in (self.rho, self.alpha, self.ts,
                                                               self.ab))  # fmt: skip
        raw = {name: jnp.asarray(v, dtype)[step] for name, v in params.items()}
        r, w, c, a, gamma = constrained(self.method, self.options, raw)
        gamma_bar = None
        if gamma is not None:
            gamma_bar = jnp.where(step == 0, 0.0, jnp.sum(w * gamma)).astype(dtype)
        new = probe_row(self.schedule, rho[step], rho[step + 1], alpha[step], alpha[step + 1],
                        ts[step], r, w, c, a, gamma_bar, ab[step], self.history)  # fmt: skip
        return jax.tree.map(lambda f: f.astype(dtype), new)


def _grid(schedule: NoiseSchedule, ts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ts = np.asarray(ts, np.float64)
    return ts, np.asarray(schedule.rho(ts), np.float64), np.exp(schedule.log_alpha(ts))


def _rule(method: str):
    def make(schedule, ts, order: int = 0, **options) -> ProbeRule:
        opts = probe_options(method, options)
        ts, rho, alpha = _grid(schedule, ts)
        ab = ab_rows(method, ts.shape[0] - 1, order)
        return ProbeRule(method, schedule, ts, rho, alpha, ab, opts,
                         _history(method, order, opts["probes"]))  # fmt: skip

    return make


def _builder(method: str):
    def build(schedule, ts, order: int = 0, **options) -> StepTable:
        """The neutral rule's table without churn (module docstring), float64 on the host."""
        xp = array_namespace(ts)
        if xp is not np:
            raise TypeError(f"{method!r} tables are built on the host (its steps are learned)")
        rule = _rule(method)(schedule, ts, order, **options)
        raw = neutral_raw(method, rule.num_steps, rule.probes)
        rows = []
        for n in range(rule.num_steps):
            r, w, c, a, _ = constrained(method, rule.options,
                                        {k: v[n].astype(np.float64) for k, v in raw.items()},
                                        xp=np)  # fmt: skip
            rows.append(probe_row(schedule, rule.rho[n], rule.rho[n + 1], rule.alpha[n],
                                  rule.alpha[n + 1], as_float(rule.ts[n], np), r, w, c, a,
                                  None, rule.ab[n], rule.history))  # fmt: skip
        return finish_table(StepTable(*(np.stack(f) for f in zip(*rows, strict=True))), np)

    build.__name__ = f"build_{method}"
    return build


def _stages(method: str):
    def stages(order: int, options) -> int:
        return 1 + probe_options(method, dict(options))["probes"]

    return stages


for _method, _orders, _default, _grid_kind in (
    ("epd", (0,), 0, "linear"),
    ("epd_ipndm", (0, 1, 2, 3), 2, "karras"),
    ("adasde", (0,), 0, "linear"),
):
    register_method(
        MethodSpec(
            _method,
            _builder(_method),
            _orders,
            _default,
            stages=_stages(_method),
            default_grid=_grid_kind,
            options=PROBE_OPTIONS,
            options_check=_options_check(_method),
            rule=_rule(_method),
            rounds=two_per_step,
        )  # fmt: skip
    )
