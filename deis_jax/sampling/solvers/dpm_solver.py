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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from deis_jax.sampling.solvers.registry import MethodSpec, register_method
from deis_jax.sampling.solvers.table import StepTable, data_prediction, multistep_table

DPMPP_ORDER3 = ("authors", "corrected")
UNIPC_VARIANTS = ("bh1", "bh2")


def phi_functions(z: float, n_max: int) -> np.ndarray:
    """``[phi_1(z), ..., phi_{n_max}(z)]`` in float64, stable for small |z|."""
    z = float(z)
    if abs(z) < 1.0:  # series phi_n(z) = sum_j z^j / (j + n)!
        out = []
        for n in range(1, n_max + 1):
            term, total = 1.0 / math.factorial(n), 0.0
            for j in range(40):
                total += term
                term *= z / (j + n + 1)
            out.append(total)
        return np.array(out)
    vals, prev = [], math.exp(z)  # phi_0 = e^z, phi_n = (phi_{n-1} - 1/(n-1)!)/z
    for n in range(1, n_max + 1):
        prev = (prev - 1.0 / math.factorial(n - 1)) / z
        vals.append(prev)
    return np.array(vals)


def _grid(schedule, ts):
    ts = np.asarray(ts, np.float64)
    log_alpha = np.asarray(schedule.log_alpha(ts), np.float64)
    log_rho = np.log(np.asarray(schedule.rho(ts), np.float64))
    alpha = np.exp(log_alpha)
    sigma = alpha * np.exp(log_rho)
    lam = -log_rho
    # sigma_{k+1}/sigma_k computed in log space
    ratio = np.exp((log_alpha[1:] + log_rho[1:]) - (log_alpha[:-1] + log_rho[:-1]))
    return ts, alpha, sigma, lam, ratio


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
    ts, alpha, _, lam, ratio = _grid(schedule, ts)
    n = ts.size - 1
    orders = step_orders(n, order, lower_order_final, lower_order_final_below)
    weight = 2.0 if order3 == "corrected" else 1.0
    coefs = np.zeros((n, 3))
    for k, q in enumerate(orders):
        h = lam[k + 1] - lam[k]
        p1, p2, p3 = phi_functions(-h, 3)
        e1 = h * p1  # 1 - e^-h
        if q == 1:
            row = np.array([e1, 0.0, 0.0])
        elif q == 2:
            r0 = (lam[k] - lam[k - 1]) / h
            d1 = np.array([1.0, -1.0, 0.0]) / r0
            row = np.array([e1, 0.0, 0.0]) + 0.5 * e1 * d1
        else:
            r0 = (lam[k] - lam[k - 1]) / h
            r1 = (lam[k - 1] - lam[k - 2]) / h
            d1_0 = np.array([1.0, -1.0, 0.0]) / r0
            d1_1 = np.array([0.0, 1.0, -1.0]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            row = np.array([e1, 0.0, 0.0]) + h * p2 * d1 + weight * h * p3 * d2
        coefs[k] = alpha[k + 1] * row
    return ratio, coefs


# --------------------------------------------------------------------------------------------
# UniPC


def _unipc_step(lam, k: int, p: int, variant: str):
    """Weights of step k (order p) on model outputs by lag: index 0 = ``x0_{k+1}`` (the
    corrector's new value), 1 = ``x0_k``, 1 + j = ``x0_{k-j}``.

    Returns ``(base, pred, corr)`` without the ``alpha_{k+1}`` factor: ``base`` is the DDIM
    term, ``pred``/``corr`` the UniP/UniC increments, each of length p + 1.
    """
    h = lam[k + 1] - lam[k]
    hh = -h
    phis = phi_functions(hh, p + 1)
    b_h = math.expm1(hh) if variant == "bh2" else hh
    # order conditions: sum_j a_j r_j^(i-1) = i! hh phi_{i+1}(hh) / B(h), i = 1..p
    rhs = np.array([math.factorial(i) * hh * phis[i] / b_h for i in range(1, p + 1)])
    rks = np.array([(lam[k - j] - lam[k]) / h for j in range(1, p)] + [1.0])
    vander = np.stack([rks ** (i - 1) for i in range(1, p + 1)])  # (p, p)
    base = np.zeros(p + 1)
    base[1] = -math.expm1(hh)
    pred = np.zeros(p + 1)
    if p >= 2:
        a = np.array([0.5]) if p == 2 else np.linalg.solve(vander[:-1, :-1], rhs[:-1])
        for j in range(1, p):  # -B sum_j a_j (x0_{k-j} - x0_k) / r_j
            pred[1 + j] += -b_h * a[j - 1] / rks[j - 1]
            pred[1] += b_h * a[j - 1] / rks[j - 1]
    a_c = np.array([0.5]) if p == 1 else np.linalg.solve(vander, rhs)
    corr = np.zeros(p + 1)
    for j in range(1, p):
        corr[1 + j] += -b_h * a_c[j - 1] / rks[j - 1]
        corr[1] += b_h * a_c[j - 1] / rks[j - 1]
    corr[0] += -b_h * a_c[-1]  # r_p = 1: a^c_p (x0_{k+1} - x0_k)
    corr[1] += b_h * a_c[-1]
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
    ts, alpha, _, lam, ratio = _grid(schedule, ts)
    n = ts.size - 1
    orders = step_orders(n, order, lower_order_final, lower_order_final_below)
    coefs = np.zeros((n, order + 1))
    prev_delta = None  # corrector minus predictor of the previous step, by lag from x0_k
    for k, p in enumerate(orders):
        base, pred, corr = _unipc_step(lam, k, p, variant)
        coefs[k, :p] += alpha[k + 1] * (base + pred)[1:]  # lags 0..p-1 from x0_k
        if prev_delta is not None:  # x^c_k = x~_k + delta . (x0_k, x0_{k-1}, ...)
            coefs[k, : prev_delta.size] += ratio[k] * prev_delta
        prev_delta = alpha[k + 1] * (corr - pred)  # lags: 0 = x0_{k+1}, 1 = x0_k, ...
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
