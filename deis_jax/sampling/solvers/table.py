"""The step table: every sampler is a time grid plus per-step coefficients.

One step ``k`` of any sampler in this package is

    X_s     = stage_x[k,s] * x_k + sum_{l<s} stage_k[k,s,l] * K_l          (s = 0..S-1)
    K_s     = pred_x[k,s] * X_s + pred_eps[k,s] * eps(X_s, t[k,s])          (one NFE each)
    x_{k+1} = out_x[k] * x_k + sum_s out_k[k,s] * K_s
              + sum_j out_hist[k,j] * K_0^{(k-1-j)} + out_noise[k] * z_k

where ``K_0^{(k-1-j)}`` is the first-stage output of an earlier step (the multistep history)
and ``z_k`` is standard normal noise. ``pred_x``/``pred_eps`` choose what the linear
combinations act on: eps itself (``0, 1``) or the data prediction
``x0 = (X - sigma eps) / alpha`` (``1/alpha, -sigma/alpha``). Multistep methods have S = 1 and
a history; Runge-Kutta methods have S stages and no history; stochastic methods add noise.
The device loop (``deis_jax.sampling.sampler.run_table``) is nothing but these multiply-adds.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class StepTable(NamedTuple):
    t: np.ndarray  # (N, S) stage times, continuous SDE time
    stage_x: np.ndarray  # (N, S)
    stage_k: np.ndarray  # (N, S, S), strictly lower triangular in the last two axes
    pred_x: np.ndarray  # (N, S)
    pred_eps: np.ndarray  # (N, S)
    out_x: np.ndarray  # (N,)
    out_k: np.ndarray  # (N, S)
    out_hist: np.ndarray  # (N, H)
    out_noise: np.ndarray  # (N,)

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])

    @property
    def num_stages(self) -> int:
        return int(self.t.shape[1])

    @property
    def history(self) -> int:
        return int(self.out_hist.shape[1])

    @property
    def nfe(self) -> int:
        return self.num_steps * self.num_stages

    def as_numpy(self) -> StepTable:
        return StepTable(*(np.asarray(a, dtype=np.float64) for a in self))


def eps_prediction(n: int, s: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(pred_x, pred_eps)`` for methods that combine eps values."""
    return np.zeros((n, s)), np.ones((n, s))


def data_prediction(alpha, sigma) -> tuple[np.ndarray, np.ndarray]:
    """``(pred_x, pred_eps)`` turning eps into ``x0 = (X - sigma eps)/alpha`` at each stage."""
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    return 1.0 / alpha, -sigma / alpha


def multistep_table(
    ts,
    out_x,
    coefs,
    *,
    prediction: tuple[np.ndarray, np.ndarray] | None = None,
    out_noise=None,
) -> StepTable:
    """Single-stage table: ``x_{k+1} = out_x_k x_k + sum_j coefs[k, j] K_{k-j} (+ noise)``.

    ``coefs[:, 0]`` multiplies the current evaluation, ``coefs[:, j]`` the one j steps back.
    """
    ts = np.asarray(ts, np.float64)
    coefs = np.asarray(coefs, np.float64)
    n = ts.size - 1
    pred_x, pred_eps = eps_prediction(n) if prediction is None else prediction
    return StepTable(
        t=ts[:-1, None],
        stage_x=np.ones((n, 1)),
        stage_k=np.zeros((n, 1, 1)),
        pred_x=np.reshape(pred_x, (n, 1)),
        pred_eps=np.reshape(pred_eps, (n, 1)),
        out_x=np.asarray(out_x, np.float64),
        out_k=coefs[:, :1],
        out_hist=coefs[:, 1:],
        out_noise=np.zeros(n) if out_noise is None else np.asarray(out_noise, np.float64),
    ).as_numpy()


def final_denoise_table(schedule, t0: float) -> StepTable:
    """One extra NFE at t0 returning Tweedie's ``x0 = (x - sigma eps) / alpha``."""
    alpha, sigma = float(schedule.alpha(np.float64(t0))), float(schedule.sigma(np.float64(t0)))
    return multistep_table(
        np.array([t0, t0]), np.array([1.0 / alpha]), np.array([[-sigma / alpha]])
    )
