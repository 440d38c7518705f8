"""Learned step tables: bounded, order-0-consistent corrections of a method's coefficients.

The output of step ``k`` of a table (``deis_jax.sampling.solvers.table``) is

    x_{k+1} = out_x[k] x_k + sum_s out_k[k,s] K_s + sum_j out_hist[k,j] K_0^{(k-1-j)} (+ noise).

Write ``c_k = (out_k[k, :], out_hist[k, :])`` (length ``S + H``) for the coefficients of the
model outputs. A learned table (the S4S / Bespoke idea, fitting spec section 5.2) keeps the
grid, the stage layout and ``out_x`` and adds a correction to ``c_k``:

    m_k    = active slots: every stage output; history slot j only if j < k (it exists)
    s_k    = | sum_{i in m_k} c_{k,i} |                  (the DDIM-like total coefficient)
    d_k    = max_delta * s_k * tanh(raw_k) * m_k         (|d_{k,i}| <= max_delta * s_k)
    Delta_k = (d_k - mean_{i in m_k} d_{k,i}) * m_k      (sum_i Delta_{k,i} = 0)
    c_k   <- c_k + Delta_k

Because every row's correction sums to zero, ``sum_i c_{k,i}`` -- the coefficient a constant
model output sees -- is unchanged: the learned table is exact wherever the base method is
exact for a constant eps (order-0 consistency). After centring each entry is bounded by
``|Delta_{k,i}| <= 2 (1 - 1/n_k) max_delta s_k`` with ``n_k = |m_k|``; a row with a single
active slot (DDIM, the first step of a multistep method) cannot change. ``raw = 0`` gives
``Delta = 0`` exactly (``tanh(0) = 0``), so the base table is reproduced bit for bit.

All functions work on numpy tables (float64, on the host) and on ``jax.numpy`` tables, also
traced inside ``jax.jit``/``jax.grad`` (e.g. a table built from a grid being fitted).
"""

from __future__ import annotations

import numpy as np

from deis_jax.sampling.sde import Array, array_namespace
from deis_jax.sampling.solvers.table import StepTable


def correction_mask(table: StepTable) -> np.ndarray:
    """Boolean ``(N, S + H)`` mask of the coefficient slots a correction may change.

    Columns ``0..S-1`` are the stage outputs ``out_k`` (always active); column ``S + j`` is the
    history slot ``out_hist[:, j]``, active in row ``k`` iff ``j < k S`` (a warm-up row has
    only ``k S`` earlier outputs). Depends only on the table's shapes, so it is static under
    ``jit``.
    """
    n, s, h = table.num_steps, table.num_stages, table.history
    history = np.arange(h)[None, :] < s * np.arange(n)[:, None]
    return np.concatenate([np.ones((n, s), dtype=bool), history], axis=1)


def correction_deltas(table: StepTable, raw: Array, max_delta: float) -> Array:
    """The sum-zero corrections ``Delta`` of shape ``(N, S + H)`` (see the module docstring).

    ``raw`` has shape ``(N, S + H)``; inactive slots are ignored (their ``Delta`` is zero).
    The namespace follows the arguments (numpy, or ``jax.numpy`` if any is a JAX array).
    """
    xp = array_namespace(table.out_k, table.out_hist, raw)
    mask = correction_mask(table)
    if tuple(raw.shape) != mask.shape:
        raise ValueError(
            f"raw corrections must have shape {mask.shape} (steps, stages + history), "
            f"got {tuple(raw.shape)}"
        )
    weight = xp.asarray(mask.astype(np.float64))
    coefs = xp.concatenate([table.out_k, table.out_hist], axis=1)
    scale = xp.abs(xp.sum(coefs * weight, axis=1, keepdims=True))
    d = max_delta * scale * xp.tanh(raw) * weight
    mean = xp.sum(d, axis=1, keepdims=True) / mask.sum(axis=1, keepdims=True)
    return (d - mean) * weight


def corrected_table(table: StepTable, raw: Array, max_delta: float) -> StepTable:
    """``table`` with its output coefficients corrected by ``raw`` (see the module docstring).

    ``out_k`` and ``out_hist`` become ``c + Delta`` split back into their columns; every other
    field is returned unchanged. ``raw = 0`` returns a table equal to ``table`` entry for
    entry. A numpy table and numpy ``raw`` give a numpy float64 table; a JAX ``raw`` or table
    (possibly traced) gives ``jax.numpy`` fields.
    """
    delta = correction_deltas(table, raw, max_delta)
    s = table.num_stages
    return table._replace(out_k=table.out_k + delta[:, :s], out_hist=table.out_hist + delta[:, s:])
