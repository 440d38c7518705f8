"""DPM-Solver++ (multistep, data prediction) and UniPC (bh1/bh2, data prediction, with UniC).

Both integrate the probability-flow ODE in the data-prediction form. With
``lambda = log(alpha/sigma) = -log rho`` (half the log-SNR), ``x0_k`` the data prediction
``(x_k - sigma_k eps_k)/alpha_k`` at grid point k and ``h = lambda_{k+1} - lambda_k > 0``, the
exact step is

    x_{k+1} = (sigma_{k+1}/sigma_k) x_k + sigma_{k+1} int_{lambda_k}^{lambda_{k+1}} e^lam x0 dlam
            = (sigma_{k+1}/sigma_k) x_k + alpha_{k+1} sum_n h^(n+1) phi_{n+1}(-h) x0^(n)(lambda_k)

(Taylor expansion of x0 in lambda; ``phi_n`` are the exponential-integrator functions
``phi_n(z) = int_0^1 e^((1-u) z) u^(n-1)/(n-1)! du``, evaluated by series for small |z|, so
no coefficient suffers the ``expm1(-h)/h + 1`` cancellation). Both methods are multistep:
one NFE per step (the model is evaluated at every grid point but the last), N steps = N NFE,
warm start with lower orders on the history available (no extra NFE). Orders follow the
DPM-Solver convention: order p uses p model values and is globally p-th order; order 1 is
DDIM (``x_{k+1} = (sigma_{k+1}/sigma_k) x_k + alpha_{k+1}(1 - e^-h) x0_k``). The default grid
is uniform in log-SNR (``default_grid='log_snr'``). Dynamic thresholding is not applied (it
belongs in the model wrapper, and is wrong for latent models).

``dpmpp`` -- DPM-Solver++(1/2M/3M) (Lu et al. 2022), with ``r0 = (lambda_k - lambda_{k-1})/h``,
``r1 = (lambda_{k-1} - lambda_{k-2})/h`` and ``phi_n = phi_n(-h)``:

    2M:  x_{k+1} = (sigma_{k+1}/sigma_k) x_k + alpha_{k+1} (1 - e^-h) (x0_k + D1/2),
         D1 = (x0_k - x0_{k-1})/r0;
    3M:  x_{k+1} = (sigma_{k+1}/sigma_k) x_k
                   + alpha_{k+1} [h phi_1 x0_k + h phi_2 D1 + f h phi_3 D2],
         D1_0 = (x0_k - x0_{k-1})/r0,  D1_1 = (x0_{k-1} - x0_{k-2})/r1,
         D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1)   (~ h x0'),
         D2 = (D1_0 - D1_1)/(r0 + r1)             (~ h^2 x0''/2).

    ``order3='authors'`` (default, f = 1) is the published 3M update (``phi_3 = phi_2/h - 1/2``
    times D2). Since D2 is h^2 x0''/2, it integrates the second-derivative term with half its
    weight: the local error is O(h^3), the same order as 2M. The method is then
    second-order asymptotically, with a smaller constant than 2M. ``order3='corrected'``
    (f = 2) matches the Taylor term exactly and is truly third order.

    ``lower_order_final`` (default True): step k uses order ``min(order, k + 1, N - k)``, so
    the last step is DDIM and the one before has order <= 2. This applies only when the number
    of steps N < ``lower_order_final_below`` (default 10, the official DPM-Solver rule; diffusers
    uses 15). Set it to None to always apply it, as diff-sampler does; use None to reproduce
    its tables.

``unipc`` -- UniPC (Zhao et al. 2023), predictor UniP-p plus corrector UniC-p, data prediction.
    With ``B(h) = e^-h - 1`` (``variant='bh2'``, default) or ``-h`` (``'bh1'``),
    ``r_j = (lambda_{k-j} - lambda_k)/h`` and ``D_j = (x0_{k-j} - x0_k)/r_j``:

        UniP:  x~_{k+1} = (sigma_{k+1}/sigma_k) x^c_k - alpha_{k+1} (e^-h - 1) x0_k
                          - alpha_{k+1} B(h) sum_{j<p} a_j D_j,
        UniC:  x^c_{k+1} = the same with sum_{j<p} a^c_j D_j + a^c_p (x0~_{k+1} - x0_k),

    where ``x0~_{k+1}`` is the model at the *predicted* ``x~_{k+1}``; that evaluation is reused
    as the next step's history, so the corrector costs no NFE. The weights solve the order
    conditions ``sum_j a_j r_j^(i-1) = i! (-h) phi_{i+1}(-h) / B(h)`` for i = 1..p-1 (UniP)
    and i = 1..p with ``r_p = 1`` (UniC). As in the reference implementation, UniP-2 uses
    ``a = 1/2`` and UniC-1 uses ``a^c = 1/2``; the exact solutions are 1/2 + O(h), so the
    order is unchanged. UniP-p is order p and UniC raises it to p + 1. There is no corrector on
    the last step, which has no model call at its end.

    Step-table form: the table state is the *predicted* ``x~_k``, the stage output is
    ``x0~_k = x0(x~_k, t_k)`` and the history holds ``x0~_{k-1}, ...``. The corrected state is
    ``x^c_k = x~_k + delta_{k-1} . (x0~_k, x0~_{k-1}, ...)``, linear in the model outputs,
    because UniP and UniC share the x and x0_k terms. So row k applies the corrector of step
    k - 1 and the predictor of step k in one linear map:
    ``x~_{k+1} = (sigma_{k+1}/sigma_k) x~_k + sum_j C_{k,j} x0~_{k-j}``. The output ``x~_N``
    equals the reference's, because the last step has no corrector. ``lower_order_final``
    works as in ``dpmpp``, but defaults to always (``lower_order_final_below=None``, the
    reference UniPC rule).

Both tables are pure array functions of the grid: a numpy ``ts`` gives numpy float64, a JAX
``ts`` (under ``jax_enable_x64``; traceable, differentiable) ``jax.numpy`` arrays from the same
code. The rows are computed one order at a time, vectorised over the steps of that order
(``deis_jax.sampling.coefficients.rows_by_order``), so a traced table has a graph whose size
does not grow with the number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from deis_jax.sampling.coefficients import rows_by_order
from deis_jax.sampling.sde import Array, array_namespace
from deis_jax.sampling.solvers.registry import MethodSpec, register_method
from deis_jax.sampling.solvers.table import (
    StepTable,
    as_float,
    data_prediction,
    finish_table,
    multistep_table,
)

DPMPP_ORDER3 = ("authors", "corrected")
UNIPC_VARIANTS = ("bh1", "bh2")
PHI_SERIES_TERMS = 40  # terms of the phi_n series used for |z| < 1 (converged in float64)


def phi_functions(z: Array, n_max: int) -> Array:
    """``[phi_1(z), ..., phi_{n_max}(z)]`` stacked on a new last axis, stable for small |z|.

    ``phi_n(z) = int_0^1 e^((1-u) z) u^(n-1)/(n-1)! du``. For ``|z| < 1`` the series
    ``phi_n(z) = sum_j z^j / (j + n)!`` (40 terms); otherwise the recurrence
    ``phi_0 = e^z``, ``phi_n = (phi_{n-1} - 1/(n-1)!) / z``. Both branches are evaluated and
    selected elementwise with ``where``; each is fed a harmless ``z`` (0 for the series, 1 for
    the recurrence) where it is not selected, so value and gradient are NaN-free. ``z`` may
    be a Python float, a numpy array (float64) or a JAX array / tracer.
    """
    xp = array_namespace(z)
    z = as_float(z, xp)
    small = xp.abs(z) < 1.0
    z_rec = xp.where(small, 1.0, z)
    ns = np.arange(1, n_max + 1)
    # the series for all n at once on a last axis, summed term by term; the operands are
    # broadcast explicitly (an elementwise chain XLA fuses into one kernel, cheap to compile
    # and to differentiate)
    shape = (*z.shape, n_max)
    z_series = xp.broadcast_to(xp.where(small, z, 0.0)[..., None], shape)
    term = xp.broadcast_to(xp.asarray([1.0 / math.factorial(n) for n in ns]), shape)
    total = xp.zeros(shape)
    for j in range(PHI_SERIES_TERMS):
        total = total + term
        term = term * (z_series / xp.asarray(j + ns + 1.0))
    prev, recurrence = xp.exp(z_rec), []
    for n in ns:
        prev = (prev - 1.0 / math.factorial(n - 1)) / z_rec
        recurrence.append(prev)
    return xp.where(small[..., None], total, xp.stack(recurrence, axis=-1))


def _grid(schedule, ts: Array) -> tuple[Array, Array, Array, Array, Array]:
    """``(ts, alpha, sigma, lambda, sigma_{k+1}/sigma_k)`` on the grid, in ``ts``' namespace."""
    xp = array_namespace(ts)
    ts = as_float(ts, xp)
    log_alpha = as_float(schedule.log_alpha(ts), xp)
    log_rho = xp.log(as_float(schedule.rho(ts), xp))
    alpha = xp.exp(log_alpha)
    sigma = alpha * xp.exp(log_rho)
    lam = -log_rho
    # sigma_{k+1}/sigma_k computed in log space
    ratio = xp.exp((log_alpha[1:] + log_rho[1:]) - (log_alpha[:-1] + log_rho[:-1]))
    return ts, alpha, sigma, lam, ratio


def _pad_columns(xp, rows: Array, width: int) -> Array:
    """``rows`` (G, w) zero-padded on the right to (G, width)."""
    return xp.concatenate([rows, xp.zeros((rows.shape[0], width - rows.shape[1]))], axis=1)


def step_orders(num_steps: int, order: int, lower_order_final: bool, below: int | None):
    """Order of each step: warm start ``min(order, k+1)``, optionally ``min(., N - k)``."""
    lower = lower_order_final and (below is None or num_steps < below)
    return [
        min(order, k + 1, num_steps - k) if lower else min(order, k + 1) for k in range(num_steps)
    ]


def _check_lower_order_final(method: str, lower_order_final, below) -> None:
    if not isinstance(lower_order_final, bool):
        raise ValueError(
            f"{method}: option 'lower_order_final' must be a bool, got {lower_order_final!r}"
        )
    if below is not None and (isinstance(below, bool) or not isinstance(below, int) or below < 1):
        raise ValueError(
            f"{method}: option 'lower_order_final_below' must be None or an integer >= 1, "
            f"got {below!r}"
        )


def _check_table(table: StepTable, method: str) -> StepTable:
    """Reject non-finite coefficients of a numpy table (a traced table passes unchecked)."""
    if array_namespace(*table) is not np:
        return table
    for name, arr in table._asdict().items():
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"method {method!r}: non-finite coefficients in {name!r}")
    return table


# --------------------------------------------------------------------------------------------
# DPM-Solver++


def dpmpp_coefficients(
    schedule,
    ts,
    order: int = 2,
    lower_order_final: bool = True,
    lower_order_final_below: int | None = 10,
    order3: str = "authors",
):
    """``(out_x, C)``: ``x_{k+1} = out_x_k x_k + sum_j C[k, j] x0_{k-j}``, C of shape (N, 3)."""
    if order3 not in DPMPP_ORDER3:
        raise ValueError(f"dpmpp: option 'order3' must be one of {DPMPP_ORDER3}, got {order3!r}")
    _check_lower_order_final("dpmpp", lower_order_final, lower_order_final_below)
    xp = array_namespace(ts)
    ts, alpha, _, lam, ratio = _grid(schedule, ts)
    orders = step_orders(ts.shape[0] - 1, order, lower_order_final, lower_order_final_below)
    weight = 2.0 if order3 == "corrected" else 1.0
    steps = lam[1:] - lam[:-1]  # h_k
    phis = phi_functions(-steps, 3)  # (N, 3)
    first = xp.asarray(np.array([1.0, 0.0, 0.0]))
    back1 = xp.asarray(np.array([1.0, -1.0, 0.0]))
    back2 = xp.asarray(np.array([0.0, 1.0, -1.0]))

    def rows_of(take: Callable, q: int) -> tuple:
        h, phi = take(steps), take(phis)
        e1 = (h * phi[:, 0])[:, None]  # 1 - e^-h
        if q == 1:
            row = e1 * first
        elif q == 2:
            r0 = (take(steps, -1) / h)[:, None]
            d1 = back1 / r0
            row = e1 * first + 0.5 * e1 * d1
        else:
            r0 = (take(steps, -1) / h)[:, None]
            r1 = (take(steps, -2) / h)[:, None]
            d1_0 = back1 / r0
            d1_1 = back2 / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            p2, p3 = phi[:, 1][:, None], phi[:, 2][:, None]
            row = e1 * first + h[:, None] * p2 * d1 + weight * h[:, None] * p3 * d2
        return (take(alpha, 1)[:, None] * row,)

    (coefs,) = rows_by_order(xp, orders, rows_of)
    return ratio, coefs


# --------------------------------------------------------------------------------------------
# UniPC


def _unipc_steps(lam: Array, phis: Array, take: Callable, p: int, variant: str, width: int):
    """Weights of a group of G steps k of order p (read through ``take(x, shift) =
    x[k + shift]``, see ``rows_by_order``) on model outputs by lag: column 0 = ``x0_{k+1}``
    (the corrector's new value), 1 = ``x0_k``, 1 + j = ``x0_{k-j}``.

    ``phis[k, i - 1] = phi_i(-h_k)`` for i = 1..p + 1 at least. Returns ``(base, pred, corr)``
    of shape ``(G, width)`` (``width >= p + 1``, zero beyond column p), without the
    ``alpha_{k+1}`` factor: ``base`` is the DDIM term, ``pred``/``corr`` the UniP/UniC
    increments.
    """
    xp = array_namespace(lam)
    lam_k = take(lam)
    h = (take(lam, 1) - lam_k)[:, None]  # (G, 1)
    hh = -h
    b_h = xp.expm1(hh) if variant == "bh2" else hh
    zero = xp.zeros_like(h)
    # order conditions: sum_j a_j r_j^(i-1) = i! hh phi_{i+1}(hh) / B(h), i = 1..p
    factorials = np.array([float(math.factorial(i)) for i in range(1, p + 1)])
    rhs = factorials * hh * take(phis)[:, 1 : p + 1] / b_h  # (G, p)
    # r_j = (lambda_{k-j} - lambda_k) / h for j = 1..p-1, and r_p = 1
    rks = xp.concatenate(
        [(take(lam, -j) - lam_k)[:, None] / h for j in range(1, p)] + [zero + 1.0], axis=1
    )
    vander = xp.stack([rks ** (i - 1) for i in range(1, p + 1)], -2)  # (G, p, p)

    def solve(mat: Array, vec: Array) -> Array:
        return xp.linalg.solve(mat, vec[..., None])[..., 0]

    def increments(a: Array) -> Array:
        """``-B sum_{j<p} a_j (x0_{k-j} - x0_k) / r_j`` by lag (column 0 is 0)."""
        terms = b_h * a[:, : p - 1] / rks[:, : p - 1]  # (G, p - 1)
        total = zero
        for j in range(p - 1):  # summed in sequence
            total = total + terms[:, j : j + 1]
        rest = xp.zeros((h.shape[0], width - 1 - p))
        return xp.concatenate([zero, total, -terms, rest], axis=1)

    half = xp.full(h.shape, 0.5)
    base = xp.concatenate([zero, -xp.expm1(hh), xp.zeros((h.shape[0], width - 2))], axis=1)
    pred = xp.zeros((h.shape[0], width))
    if p >= 2:
        pred = increments(half if p == 2 else solve(vander[:, :-1, :-1], rhs[:, :-1]))
    a_c = half if p == 1 else solve(vander, rhs)
    last = b_h * a_c[:, -1:]  # r_p = 1: a^c_p (x0_{k+1} - x0_k)
    corr = increments(a_c) + xp.concatenate([-last, last, xp.zeros((h.shape[0], width - 2))], 1)
    return base, pred, corr


def unipc_coefficients(
    schedule,
    ts,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    lower_order_final_below: int | None = None,
):
    """``(out_x, C)`` on the predicted states: ``x~_{k+1} = out_x_k x~_k + sum_j C[k,j] x0~_{k-j}``.

    C has shape (N, order + 1).
    """
    if variant not in UNIPC_VARIANTS:
        raise ValueError(
            f"unipc: option 'variant' must be one of {UNIPC_VARIANTS}, got {variant!r}"
        )
    _check_lower_order_final("unipc", lower_order_final, lower_order_final_below)
    xp = array_namespace(ts)
    ts, alpha, _, lam, ratio = _grid(schedule, ts)
    orders = step_orders(ts.shape[0] - 1, order, lower_order_final, lower_order_final_below)
    phis = phi_functions(-(lam[1:] - lam[:-1]), order + 1)  # (N, order + 1)
    width = order + 1

    def rows_of(take: Callable, p: int) -> tuple:
        base, pred, corr = _unipc_steps(lam, phis, take, p, variant, width)
        a_next = take(alpha, 1)[:, None]
        own = a_next * (base + pred)[:, 1:]  # lags 0..order-1 from x0_k
        delta = a_next * (corr - pred)  # corrector minus predictor; 0 = x0_{k+1}, 1 = x0_k
        return _pad_columns(xp, own, width), delta

    own, delta = rows_by_order(xp, orders, rows_of)
    # x^c_k = x~_k + delta_{k-1} . (x0_k, x0_{k-1}, ...): row k also applies step k-1's UniC
    coefs = xp.concatenate([own[:1], own[1:] + ratio[1:, None] * delta[:-1]])
    return ratio, coefs


def _data_prediction_builder(coefficients: Callable[..., tuple], name: str) -> Callable:
    """``build(schedule, ts, order, **options)`` of a data-prediction multistep method whose
    ``coefficients(schedule, ts, order, **options)`` returns ``(out_x, C)``."""

    def build(schedule, ts, order: int = 2, **options) -> StepTable:
        out_x, coefs = coefficients(schedule, ts, order, **options)
        _, alpha, sigma, _, _ = _grid(schedule, ts)
        prediction = data_prediction(alpha[:-1], sigma[:-1])
        return _check_table(multistep_table(ts, out_x, coefs, prediction=prediction), name)

    build.__doc__ = f"The {name} step table (data prediction; see ``{coefficients.__name__}``)."
    return build


def build_dpm2(schedule, ts, order: int = 2) -> StepTable:
    """Singlestep DPM-Solver-2 (eps form, ``r1 = 1/2``): with ``h = lambda_{k+1} - lambda_k``
    and the stage ``s`` at ``lambda_k + h/2`` (the geometric midpoint in rho),

        x_s     = (alpha_s/alpha_k) x_k - sigma_s expm1(h/2) eps(x_k, t_k),
        x_{k+1} = (alpha_{k+1}/alpha_k) x_k - sigma_{k+1} expm1(h) eps(x_s, t_s).

    Two NFE per step; globally second order. AMED's base solver (``amed`` with ``r = 1/2``)."""
    xp = array_namespace(ts)
    ts = as_float(ts, xp)
    log_alpha = as_float(schedule.log_alpha(ts), xp)
    lam = -xp.log(as_float(schedule.rho(ts), xp))
    h = lam[1:] - lam[:-1]
    lam_s = lam[:-1] + 0.5 * h
    t_s = as_float(schedule.t_from_rho(xp.exp(-lam_s)), xp)
    log_alpha_s = as_float(schedule.log_alpha(t_s), xp)
    sigma_s = xp.exp(log_alpha_s - lam_s)
    sigma_x = xp.exp(log_alpha[1:] - lam[1:])
    n = h.shape[0]
    zeros, ones = xp.zeros(n), xp.ones(n)
    table = StepTable(
        t=xp.stack([ts[:-1], t_s], axis=1),
        stage_x=xp.stack([ones, xp.exp(log_alpha_s - log_alpha[:-1])], axis=1),
        stage_k=xp.stack([xp.stack([zeros, zeros], axis=1),
                          xp.stack([-sigma_s * xp.expm1(0.5 * h), zeros], axis=1)], axis=1),
        pred_x=xp.zeros((n, 2)),
        pred_eps=xp.ones((n, 2)),
        out_x=xp.exp(log_alpha[1:] - log_alpha[:-1]),
        out_k=xp.stack([zeros, -sigma_x * xp.expm1(h)], axis=1),
        out_hist=xp.zeros((n, 0)),
        out_noise=zeros,
        stage_hist=xp.zeros((n, 2, 0)),
        stage_noise=xp.zeros((n, 2)),
    )  # fmt: skip
    return finish_table(table, xp)


build_dpmpp = _data_prediction_builder(dpmpp_coefficients, "dpmpp")
build_unipc = _data_prediction_builder(unipc_coefficients, "unipc")


# DPM-Solver++ multistep (1 = DDIM, 2M, 3M), data prediction.
register_method(
    MethodSpec(
        "dpmpp",
        build_dpmpp,
        (1, 2, 3),
        2,
        default_grid="log_snr",
        options=("lower_order_final", "lower_order_final_below", "order3"),
    )
)
# Singlestep DPM-Solver-2 (eps form), AMED's base solver.
register_method(
    MethodSpec(
        "dpm2", build_dpm2, (2,), 2, stages=lambda order, options: 2, default_grid="karras"
    )  # fmt: skip
)
# UniPC: UniP-p predictor + UniC corrector (order p + 1), data prediction.
register_method(
    MethodSpec(
        "unipc",
        build_unipc,
        (1, 2, 3),
        2,
        default_grid="log_snr",
        options=("variant", "lower_order_final", "lower_order_final_below"),
    )
)
