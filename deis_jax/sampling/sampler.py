"""``get_sampler``: one entry point, one generic ``lax.scan`` loop for every method.

    sampler = get_sampler(schedule, eps_fn, method="tab", order=3, nfe=10)
    x0 = jax.jit(sampler)(x_T)            # deterministic methods
    x0 = jax.jit(sampler)(x_T, key)       # stochastic methods

The coefficients are built once on the host in float64 (a ``StepTable``, see
``deis_jax.sampling.solvers.table``) and cast to the working dtype; the device loop is a scan
over the table rows whose body is the network call plus a few multiply-adds. Its size does not
depend on the number of steps, so compile time and memory are flat in NFE.

Randomness: the noise for sample ``i`` at step ``k`` is drawn from
``fold_in(fold_in(key, index_offset + i), k)``, so it depends only on the key, the *global*
sample index and the step -- never on the batch size or the device layout.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.sampling import solvers
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.sampling.solvers.table import StepTable, final_denoise_table
from deis_jax.sampling.timesteps import time_grid, validate_grid
from deis_jax.sampling.wrappers import EpsFn


def per_sample_normal(key: jax.Array, sample_index: jax.Array, step: jax.Array, shape, dtype):
    """Standard normal noise of ``shape = (B, ...)``, keyed by (key, global index, step)."""

    def one(i):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), step), shape[1:])

    return jax.vmap(one)(sample_index).astype(dtype)


def run_table(
    eps_fn: EpsFn,
    table: StepTable,
    x: jax.Array,
    key: jax.Array | None = None,
    sample_index: jax.Array | None = None,
) -> jax.Array:
    """Apply every row of ``table`` to ``x`` with one ``lax.scan`` (see ``StepTable``)."""
    num_stages, history = table.num_stages, table.history
    # Static structure read off the host table: skip work that is identically zero.
    converts = bool(np.any(table.pred_x != 0) or np.any(table.pred_eps != 1))
    noisy = bool(np.any(table.out_noise != 0))
    if noisy and key is None:
        raise ValueError("this sampler is stochastic: pass a PRNG key")
    if noisy and sample_index is None:
        sample_index = jnp.arange(x.shape[0])
    if history:
        # The history is a ring buffer: the first-stage output of step k goes to slot
        # k mod H (an in-place update, no shifting copies), so the coefficient of
        # K^(k-1-j) moves to slot (k-1-j) mod H -- a permutation done here, on the host.
        ks_ = np.arange(table.num_steps)[:, None]
        slots = (ks_ - 1 - np.arange(history)[None, :]) % history
        ring = np.zeros_like(table.out_hist)
        np.put_along_axis(ring, slots, table.out_hist, axis=1)
        table = table._replace(out_hist=ring)
    rows = jax.tree.map(lambda a: jnp.asarray(a, dtype=x.dtype), table)
    steps = jnp.arange(table.num_steps)

    def body(carry, row_and_step):
        x_k, hist = carry
        row, step = row_and_step
        ks = []
        for s in range(num_stages):
            x_s = x_k if s == 0 else row.stage_x[s] * x_k
            for l_ in range(s):
                x_s = x_s + row.stage_k[s, l_] * ks[l_]
            eps = eps_fn(x_s, row.t[s])
            ks.append(row.pred_x[s] * x_s + row.pred_eps[s] * eps if converts else eps)
        x_next = row.out_x * x_k
        for s in range(num_stages):
            x_next = x_next + row.out_k[s] * ks[s]
        for j in range(history):
            x_next = x_next + row.out_hist[j] * hist[j]
        if noisy:
            z = per_sample_normal(key, sample_index, step, x_k.shape, x_k.dtype)
            x_next = x_next + row.out_noise * z
        if history:
            slot = step % history
            hist = jax.lax.dynamic_update_index_in_dim(hist, ks[0], slot, axis=0)
        return (x_next, hist), None

    hist0 = jnp.zeros((history,) + x.shape, x.dtype)
    (x, _), _ = jax.lax.scan(body, (x, hist0), (rows, steps))
    return x


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A jittable ``x_T -> x_0`` map with everything a benchmark or a test needs to inspect.

    ``nfe`` is the exact number of ``eps_fn`` calls per sample (final denoise included),
    ``ts`` the float64 time grid, ``table`` the float64 coefficients.
    """

    eps_fn: EpsFn
    schedule: NoiseSchedule
    method: str
    order: int
    ts: np.ndarray
    table: StepTable
    final_table: StepTable | None
    options: dict

    @property
    def nfe(self) -> int:
        return self.table.nfe + (self.final_table.nfe if self.final_table is not None else 0)

    @property
    def num_steps(self) -> int:
        return self.table.num_steps

    @property
    def stochastic(self) -> bool:
        return bool(np.any(self.table.out_noise != 0))

    def __call__(
        self,
        x_T: jax.Array,
        key: jax.Array | None = None,
        index_offset: int | jax.Array = 0,
        sample_index: jax.Array | None = None,
    ) -> jax.Array:
        """Integrate from ``ts[0]`` to ``ts[-1]``.

        The noise of row i is keyed by its global sample index: ``sample_index[i]`` when
        given (rows in any order, e.g. a shard of a sharded batch), else ``index_offset + i``.
        """
        if key is not None and sample_index is None:
            sample_index = index_offset + jnp.arange(x_T.shape[0])
        x = run_table(self.eps_fn, self.table, x_T, key, sample_index)
        if self.final_table is not None:
            x = run_table(self.eps_fn, self.final_table, x)
        return x


def get_sampler(
    schedule: NoiseSchedule,
    eps_fn: EpsFn,
    ts=None,
    *,
    method: str = "tab",
    order: int | None = None,
    nfe: int | None = None,
    grid: str | None = None,
    grid_power: float | None = None,
    t0: float | None = None,
    t1: float | None = None,
    final_denoise: bool = False,
    **options,
) -> Sampler:
    """Build a sampler.

    Either give an explicit decreasing grid ``ts`` or an NFE budget ``nfe`` with a grid kind
    (``deis_jax.sampling.timesteps.GRID_KINDS``; None = the method's default grid),
    ``grid_power`` (kinds ``time`` and ``rho`` only) and the interval ``[t0, t1]`` (schedule
    defaults when None). A method spending S NFE per step takes ``ceil(nfe / S)`` steps
    (Runge-Kutta rounds up, as in the DEIS table); ``final_denoise`` adds one NFE. ``options``
    are method-specific (e.g. ``tableau`` for ``rhork``). The method's spec checks the order,
    the options and the NFE (``MethodSpec.check``); a bad argument raises ``ValueError``.
    """
    spec = solvers.get_method(method)
    order = spec.check(order, options, final_denoise=final_denoise)
    if ts is None:
        nfe = spec.check_nfe(nfe, order)
        num_steps = math.ceil(nfe / spec.nfe_per_step(order, options))
        grid = spec.default_grid if grid is None else grid
        ts = time_grid(schedule, num_steps, grid, power=grid_power, t0=t0, t1=t1)
    else:
        ts = np.asarray(ts, dtype=np.float64)
        validate_grid(schedule, ts)
    table = spec.build(schedule, ts, order, **options)
    final = final_denoise_table(schedule, float(ts[-1])) if final_denoise else None
    return Sampler(eps_fn, schedule, method, order, ts, table, final, dict(options))
