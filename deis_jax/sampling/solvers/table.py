"""The step table: every sampler is a time grid plus per-step coefficients.

One step ``k`` of any sampler in this package is

    X_s     = stage_x[k,s] * x_k + sum_{l<s} stage_k[k,s,l] * K_l
              + sum_j stage_hist[k,s,j] * E_{k,j} + stage_noise[k,s] * z_k      (s = 0..S-1)
    K_s     = pred_x[k,s] * X_s + pred_eps[k,s] * eps(X_s, t[k,s])          (one NFE each)
    x_{k+1} = out_x[k] * x_k + sum_s out_k[k,s] * K_s
              + sum_j out_hist[k,j] * E_{k,j} + out_noise[k] * z_k

where ``E_{k,j}`` is the (j+1)-th most recent stage output *before* step k, counting every
stage of every earlier step (the multistep history: for single-stage methods
``E_{k,j} = K_0^{(k-1-j)}``; a two-stage method with history, such as AMED-Plugin on iPNDM,
also remembers its intermediate evaluations), and ``z_k`` is standard normal noise, drawn once
per step (``stage_noise``: noise injected before the step's evaluations, AdaSDE's churn; the
first stage reads ``x_k`` itself unless a table scales it or adds noise there).
``pred_x``/``pred_eps`` choose what the linear combinations act on: eps itself (``0, 1``) or
the data prediction ``x0 = (X - sigma eps) / alpha`` (``1/alpha, -sigma/alpha``). Multistep
methods have S = 1 and a history; Runge-Kutta methods have S stages and no history;
stochastic methods add noise; AMED's two-stage steps also have a history.
The device loop (``deis_jax.sampling.sampler.run_table``) is nothing but these multiply-adds.

Tables are pure array functions of the time grid: built from a numpy grid they are numpy
float64 (``StepTable.as_numpy``); built from a JAX array (under ``jax_enable_x64``, possibly a
tracer inside ``jax.jit``/``jax.grad``) every field is a ``jax.numpy`` array computed by the
same code, so a grid can be optimised through its coefficients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from deis_jax.sampling.sde import Array, array_namespace


class StepTable(NamedTuple):
    """Per-step coefficients (numpy float64 on the host, or ``jax.numpy`` arrays when built
    from a JAX grid); shapes below with N steps, S stages and H history slots."""

    t: Array  # (N, S) stage times, continuous SDE time
    stage_x: Array  # (N, S)
    stage_k: Array  # (N, S, S), strictly lower triangular in the last two axes
    pred_x: Array  # (N, S)
    pred_eps: Array  # (N, S)
    out_x: Array  # (N,)
    out_k: Array  # (N, S)
    out_hist: Array  # (N, H)
    out_noise: Array  # (N,)
    stage_hist: Array  # (N, S, H); row s = 0 is zero (the first stage reads x_k only)
    stage_noise: Array  # (N, S) coefficient of the step's noise z_k in each stage input

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


def as_float(x: Array, xp) -> Array:
    """``x`` as a float array of namespace ``xp``: float64 for numpy; for ``jax.numpy`` the
    default float dtype (float64 under ``jax_enable_x64``), without a host round trip."""
    if xp is np:
        return np.asarray(x, dtype=np.float64)
    return jnp.asarray(x, dtype=jnp.result_type(float))


def finish_table(table: StepTable, xp) -> StepTable:
    """``table.as_numpy()`` when it was built with numpy, else ``table`` unchanged (its fields
    stay ``jax.numpy`` arrays, possibly tracers)."""
    return table.as_numpy() if xp is np else table


def eps_prediction(n: int, s: int = 1, xp=np) -> tuple[Array, Array]:
    """``(pred_x, pred_eps) = (0, 1)`` of shape ``(n, s)`` for methods that combine eps values."""
    return xp.zeros((n, s)), xp.ones((n, s))


def data_prediction(alpha: Array, sigma: Array) -> tuple[Array, Array]:
    """``(pred_x, pred_eps) = (1/alpha, -sigma/alpha)``: eps turned into
    ``x0 = (X - sigma eps)/alpha`` at each stage. The namespace follows the arguments."""
    xp = array_namespace(alpha, sigma)
    alpha, sigma = as_float(alpha, xp), as_float(sigma, xp)
    return 1.0 / alpha, -sigma / alpha


def multistep_table(
    ts: Array,
    out_x: Array,
    coefs: Array,
    *,
    prediction: tuple[Array, Array] | None = None,
    out_noise: Array | None = None,
) -> StepTable:
    """Single-stage table: ``x_{k+1} = out_x_k x_k + sum_j coefs[k, j] K_{k-j} (+ noise)``.

    ``coefs[:, 0]`` multiplies the current evaluation, ``coefs[:, j]`` the one j steps back.
    With numpy inputs the table is numpy float64; if any input is a JAX array (or tracer) the
    fields are ``jax.numpy`` arrays.
    """
    extra = (() if prediction is None else tuple(prediction)) + (
        () if out_noise is None else (out_noise,)
    )
    xp = array_namespace(ts, out_x, coefs, *extra)
    ts, coefs = as_float(ts, xp), as_float(coefs, xp)
    n = ts.shape[0] - 1
    pred_x, pred_eps = eps_prediction(n, xp=xp) if prediction is None else prediction
    table = StepTable(
        t=ts[:-1, None],
        stage_x=xp.ones((n, 1)),
        stage_k=xp.zeros((n, 1, 1)),
        pred_x=xp.reshape(as_float(pred_x, xp), (n, 1)),
        pred_eps=xp.reshape(as_float(pred_eps, xp), (n, 1)),
        out_x=as_float(out_x, xp),
        out_k=coefs[:, :1],
        out_hist=coefs[:, 1:],
        out_noise=xp.zeros(n) if out_noise is None else as_float(out_noise, xp),
        stage_hist=xp.zeros((n, 1, coefs.shape[1] - 1)),
        stage_noise=xp.zeros((n, 1)),
    )
    return finish_table(table, xp)


def final_denoise_table(schedule, t0: float) -> StepTable:
    """One extra NFE at t0 returning Tweedie's ``x0 = (x - sigma eps) / alpha``."""
    alpha, sigma = float(schedule.alpha(np.float64(t0))), float(schedule.sigma(np.float64(t0)))
    return multistep_table(
        np.array([t0, t0]), np.array([1.0 / alpha]), np.array([[-sigma / alpha]])
    )
