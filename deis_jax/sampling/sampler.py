"""Plans and samplers: one generic ``lax.scan`` loop for every method.

    plan = make_plan(schedule, method="tab", order=3, nfe=10)    # no model involved
    x0 = jax.jit(sample, static_argnums=0)(plan, eps_fn, x_T)   # the model is an argument

    sampler = get_sampler(schedule, eps_fn, method="tab", order=3, nfe=10)  # plan + eps_fn
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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.sampling import solvers
from deis_jax.sampling.sde import NoiseSchedule, array_namespace
from deis_jax.sampling.solvers.table import StepTable, final_denoise_table
from deis_jax.sampling.timesteps import time_grid, validate_grid
from deis_jax.sampling.wrappers import EpsFn


def per_sample_normal(key: jax.Array, sample_index: jax.Array, step: jax.Array, shape, dtype):
    """Standard normal noise of ``shape = (B, ...)``, keyed by (key, global index, step)."""

    def one(i):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), step), shape[1:])

    return jax.vmap(one)(sample_index).astype(dtype)


class TableStructure(NamedTuple):
    """The static shape of a step table's loop body, read once off a host table.

    ``converts``: some stage combines data predictions (``pred_x != 0`` or ``pred_eps != 1``);
    ``noisy``: some step adds noise. Tables with the same structure run through the same
    compiled loop, whatever their values (e.g. a table traced from a grid being fitted).
    """

    num_stages: int
    history: int
    converts: bool
    noisy: bool


def table_structure(table: StepTable) -> TableStructure:
    """The :class:`TableStructure` of a concrete (host) table."""
    pred_x, pred_eps, out_noise = (np.asarray(a) for a in (table.pred_x, table.pred_eps,
                                                            table.out_noise))  # fmt: skip
    return TableStructure(
        num_stages=table.num_stages,
        history=table.history,
        converts=bool(np.any(pred_x != 0) or np.any(pred_eps != 1)),
        noisy=bool(np.any(out_noise != 0)),
    )


def ring_coefficients(table: StepTable):
    """First-stage output coefficients of every step, laid out for a ring buffer.

    The loop keeps the last ``R = history + 1`` first-stage outputs in a ring: the output of
    step k goes to slot ``k mod R`` *before* the step's update reads the ring, so the buffer
    is written in place and only read afterwards (no copy of the history per step). Row k of
    the result holds, in slot ``(k - j) mod R``, the coefficient of ``K_0^(k-j)``
    (``out_k[k, 0]`` for j = 0, ``out_hist[k, j - 1]`` after): a static gather, so it works
    on host arrays and on traced ones alike.
    """
    xp = array_namespace(table.out_k, table.out_hist)
    lagged = xp.concatenate([table.out_k[:, :1], table.out_hist], axis=1)  # (N, R) by lag j
    ring = lagged.shape[1]
    slot_to_lag = (np.arange(table.num_steps)[:, None] - np.arange(ring)[None, :]) % ring
    return xp.take_along_axis(lagged, xp.asarray(slot_to_lag), axis=1)


def run_table(
    eps_fn: EpsFn,
    table: StepTable,
    x: jax.Array,
    key: jax.Array | None = None,
    sample_index: jax.Array | None = None,
    *,
    structure: TableStructure | None = None,
    trajectory: bool = False,
):
    """Apply every row of ``table`` to ``x`` with one ``lax.scan`` (see ``StepTable``).

    ``structure`` (default: read off ``table``, which must then be concrete) fixes what the
    loop body computes; pass it when ``table`` is traced, e.g. built from a grid under
    ``jax.grad``. With ``trajectory=True`` the result is ``(x_0, states)``, ``states`` of
    shape ``(N + 1, *x.shape)``: the state at every grid point, ``x`` first.
    """
    structure = table_structure(table) if structure is None else structure
    num_stages, history = structure.num_stages, structure.history
    if structure.noisy and key is None:
        raise ValueError("this sampler is stochastic: pass a PRNG key")
    if structure.noisy and sample_index is None:
        sample_index = jnp.arange(x.shape[0])
    ring_size = history + 1 if history else 0
    if ring_size:
        table = table._replace(out_hist=ring_coefficients(table))
    rows = jax.tree.map(lambda a: jnp.asarray(a, dtype=x.dtype), table)
    steps = jnp.arange(table.num_steps)

    def body(carry, row_and_step):
        x_k, ring = carry
        row, step = row_and_step
        ks = []
        for s in range(num_stages):
            x_s = x_k if s == 0 else row.stage_x[s] * x_k
            for l_ in range(s):
                x_s = x_s + row.stage_k[s, l_] * ks[l_]
            eps = eps_fn(x_s, row.t[s])
            ks.append(row.pred_x[s] * x_s + row.pred_eps[s] * eps if structure.converts else eps)
        x_next = row.out_x * x_k
        if ring_size:
            ring = jax.lax.dynamic_update_index_in_dim(ring, ks[0], step % ring_size, axis=0)
            for slot in range(ring_size):
                x_next = x_next + row.out_hist[slot] * ring[slot]
        else:
            x_next = x_next + row.out_k[0] * ks[0]
        for s in range(1, num_stages):
            x_next = x_next + row.out_k[s] * ks[s]
        if structure.noisy:
            z = per_sample_normal(key, sample_index, step, x_k.shape, x_k.dtype)
            x_next = x_next + row.out_noise * z
        return (x_next, ring), (x_next if trajectory else None)

    ring0 = jnp.zeros((ring_size,) + x.shape, x.dtype)
    (x_out, _), states = jax.lax.scan(body, (x, ring0), (rows, steps))
    if trajectory:
        return x_out, jnp.concatenate([x[None], states], axis=0)
    return x_out


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingPlan:
    """A method on a time grid, with no model: everything :func:`sample` needs but ``eps_fn``.

    ``ts`` is the float64 grid, ``table`` the float64 coefficients (``final_table`` the
    optional Tweedie step), ``nfe`` the exact number of ``eps_fn`` calls per sample. A plan is
    built once (:func:`make_plan`) and run with any network: ``sample(plan, eps_fn, x_T)``.
    Plans hash by identity, so one can be a static argument of ``jax.jit``.
    """

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
    def structure(self) -> TableStructure:
        return table_structure(self.table)

    @property
    def stochastic(self) -> bool:
        return self.structure.noisy

    def build_table(self, ts) -> StepTable:
        """This plan's method and options on another grid ``ts`` (host or traced): the
        builder ordinary sampling uses, so a fitted grid runs the very same method."""
        return solvers.get_method(self.method).build(self.schedule, ts, self.order,
                                                     **self.options)  # fmt: skip


def sample(
    plan: SamplingPlan,
    eps_fn: EpsFn,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    index_offset: int | jax.Array = 0,
    sample_index: jax.Array | None = None,
    table: StepTable | None = None,
    trajectory: bool = False,
):
    """Integrate ``x_T`` from ``plan.ts[0]`` to ``plan.ts[-1]`` with the network ``eps_fn``.

    Pure and jittable: ``jax.jit(sample, static_argnums=0)(plan, eps_fn, x_T)``. The model is
    an argument: pass ``eps_fn`` as a pytree (``eps_fn_from_model`` of a
    ``jax.tree_util.Partial(apply, params)``) and its parameters are arguments of the
    compiled function, not constants baked into it. ``table`` replaces ``plan.table`` by one of
    the same structure (e.g. ``plan.build_table(ts)`` traced from a grid being fitted).
    The noise of row i is keyed by its global sample index: ``sample_index[i]`` when given
    (rows in any order, e.g. a shard of a sharded batch), else ``index_offset + i``.
    ``trajectory=True`` also returns the states at the grid points (see :func:`run_table`).
    """
    structure = plan.structure
    if key is not None and sample_index is None:
        sample_index = index_offset + jnp.arange(x_T.shape[0])
    table = plan.table if table is None else table
    out = run_table(eps_fn, table, x_T, key, sample_index, structure=structure,
                    trajectory=trajectory)  # fmt: skip
    x, states = out if trajectory else (out, None)
    if plan.final_table is not None:
        x = run_table(eps_fn, plan.final_table, x)
    return (x, states) if trajectory else x


def make_plan(
    schedule: NoiseSchedule,
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
) -> SamplingPlan:
    """Build a :class:`SamplingPlan`.

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
    return SamplingPlan(schedule, method, order, ts, table, final, dict(options))


def _plan_field(name: str) -> property:
    return property(lambda self: getattr(self.plan, name), doc=f"``plan.{name}``")


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A plan bound to a network: a jittable ``x_T -> x_0`` map (``get_sampler``'s result).

    Exposes the plan's fields (``ts``, ``table``, ``nfe``, ...) for benchmarks and tests.
    """

    plan: SamplingPlan
    eps_fn: EpsFn

    schedule = _plan_field("schedule")
    method = _plan_field("method")
    order = _plan_field("order")
    ts = _plan_field("ts")
    table = _plan_field("table")
    final_table = _plan_field("final_table")
    options = _plan_field("options")
    nfe = _plan_field("nfe")
    num_steps = _plan_field("num_steps")
    stochastic = _plan_field("stochastic")

    def __call__(
        self,
        x_T: jax.Array,
        key: jax.Array | None = None,
        index_offset: int | jax.Array = 0,
        sample_index: jax.Array | None = None,
    ) -> jax.Array:
        """``sample(self.plan, self.eps_fn, x_T, key, ...)``."""
        return sample(self.plan, self.eps_fn, x_T, key, index_offset=index_offset,
                      sample_index=sample_index)  # fmt: skip


def get_sampler(schedule: NoiseSchedule, eps_fn: EpsFn, ts=None, **plan_args) -> Sampler:
    """``Sampler(make_plan(schedule, ts, **plan_args), eps_fn)``: a plan bound to a network
    (see :func:`make_plan` for the arguments)."""
    return Sampler(make_plan(schedule, ts, **plan_args), eps_fn)
