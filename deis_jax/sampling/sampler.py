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
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.common.precision import check_state_dtype
from deis_jax.sampling import solvers
from deis_jax.sampling.diagnostics import (
    NonFiniteSamplesError,
    finite_rows,
    nonfinite_samples,
    shown,
)
from deis_jax.sampling.rule_params import RuleParams, checked_rule_params
from deis_jax.sampling.sde import NoiseSchedule, check_schedule
from deis_jax.sampling.solvers.table import StepTable, final_denoise_table
from deis_jax.sampling.timesteps import time_grid, validate_grid
from deis_jax.sampling.wrappers import EpsFn, call_per_sample, eps_of, eps_with_features


def per_sample_normal(key: jax.Array, sample_index: jax.Array, step: jax.Array, shape, dtype):
    """Standard normal noise of ``shape = (B, ...)``, keyed by (key, global index, step)."""

    def one(i):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), step), shape[1:])

    return jax.vmap(one)(sample_index).astype(dtype)


class TableStructure(NamedTuple):
    """The static shape of a step table's loop body, read once off a host table.

    ``converts``: some stage combines data predictions (``pred_x != 0`` or ``pred_eps != 1``);
    ``noisy``: some step adds noise; ``stage_history``: some stage input reads the history
    (``stage_hist != 0``); ``churn``: some stage input adds the step's noise or the first stage
    rescales ``x_k`` (``stage_noise != 0``, ``stage_x[:, 0] != 1``; AdaSDE);
    ``parallel``: the stages after the first read only the first stage and the history, and
    are evaluated by one network call on their concatenated inputs (EPD's probes). Tables with
    the same structure run through the same compiled loop, whatever their values (e.g. a
    table traced from a grid being fitted).
    """

    num_stages: int
    history: int
    converts: bool
    noisy: bool
    stage_history: bool = False
    churn: bool = False
    parallel: bool = False


def table_structure(table: StepTable, rule: StepRule | None = None) -> TableStructure:
    """The :class:`TableStructure` of a concrete (host) table, widened by what ``rule`` (the
    plan's :class:`StepRule`, if any) may put in its rows (``rule.stochastic``: noise and
    churn; ``rule.parallel``: parallel stages, checked against the table)."""
    pred_x, pred_eps, out_noise, stage_hist, stage_noise, stage_x, stage_k = (
        np.asarray(a)
        for a in (
            table.pred_x,
            table.pred_eps,
            table.out_noise,
            table.stage_hist,
            table.stage_noise,
            table.stage_x,
            table.stage_k,
        )  # fmt: skip
    )
    stochastic = bool(getattr(rule, "stochastic", False))
    parallel = bool(getattr(rule, "parallel", False))
    if parallel and np.any(stage_k[:, :, 1:] != 0):
        raise ValueError("a parallel rule's stages may read only the first stage's output")
    return TableStructure(
        num_stages=table.num_stages,
        history=table.history,
        converts=bool(np.any(pred_x != 0) or np.any(pred_eps != 1)),
        noisy=stochastic or bool(np.any(out_noise != 0) or np.any(stage_noise != 0)),
        stage_history=bool(np.any(stage_hist != 0)),
        churn=stochastic or bool(np.any(stage_noise != 0) or np.any(stage_x[:, 0] != 1)),
        parallel=parallel,
    )


class StepRule(Protocol):
    """Step coefficients computed on the device, per sample, inside the sampling loop.

    ``rule(params, row, step, x, features) -> row'`` is called once per step, right after the
    first stage's network call: ``row`` is the host table's row of step ``step`` (a traced
    integer), ``x`` the state at the step's start (batch ``B``), ``features`` the network's
    bottleneck feature of that call (``(B, F)``; None unless ``needs_features``) and
    ``params`` the rule's learned parameters. The returned row has the same structure; any
    field may carry a trailing batch axis (``t`` of shape ``(S, B)``, ``out_k`` ``(S, B)``,
    ...) for per-sample coefficients, and stage times ``t[s]`` for ``s >= 1`` may differ per
    sample. AMED's predictor (``deis_jax.sampling.solvers.amed``) is one such rule; a learned
    per-step noise or parallel directions would be another, running through the same loop.
    ``options``: the method's options with the rule's defaults filled in (part of what learned
    parameters are trained for, ``deis_jax.sampling.rule_params``).

    A rule that needs no features is called *before* the step's first stage, so its row may
    also change that stage (its time, ``stage_x[0]``, ``stage_noise``). Optional attributes
    widen the loop's :class:`TableStructure`: ``stochastic`` (its rows may add noise, so the
    sampler takes a key) and ``parallel`` (the stages after the first are evaluated in one
    network call, ``deis_jax.sampling.solvers.probe``).
    """

    needs_features: bool
    options: dict

    def __call__(self, params, row: StepTable, step: jax.Array, x: jax.Array, features): ...


def _scaled(c: jax.Array, v: jax.Array) -> jax.Array:
    """``c * v`` for a scalar ``c`` or a per-sample ``c`` of shape ``(B,)``."""
    return c * v if c.ndim == 0 else c.reshape(c.shape + (1,) * (v.ndim - 1)) * v


def _ring_sum(ring: jax.Array, lagged: jax.Array, newest: jax.Array) -> jax.Array:
    """``sum_L lagged[L] * (the output written L evaluations before the newest one)``.

    The ring holds the last ``R`` stage outputs, output number ``e`` in slot ``e mod R``;
    ``newest`` is the number of the most recent one. ``lagged`` (``(R,)`` or per sample
    ``(R, B)``) is permuted to slot order with a small gather, so the ring itself is only
    written in place and read, never shifted or copied."""
    size = ring.shape[0]
    by_slot = jnp.take(lagged, (newest - jnp.arange(size)) % size, axis=0)
    total = _scaled(by_slot[0], ring[0])
    for slot in range(1, size):
        total = total + _scaled(by_slot[slot], ring[slot])
    return total


def _check_state(x: jax.Array) -> None:
    """The sampled state must be a floating array with a leading batch axis, float32 or wider
    (its dtype is the working precision: coefficients and eps are cast to it; a bfloat16 /
    float16 network runs in a float32 state, ``deis_jax.common.precision``)."""
    if jnp.ndim(x) < 1 or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            "x_T must be a floating array with a leading batch axis, got shape "
            f"{jnp.shape(x)} and dtype {jnp.result_type(x)}"
        )
    check_state_dtype(jnp.result_type(x))


def _checked_eps(eps: jax.Array, x: jax.Array) -> jax.Array:
    """``eps`` (the network's output for the input ``x``) in ``x``'s dtype, after a check of
    its type, shape and dtype. Python-level on the abstract values, so it runs once when the
    loop is traced and costs nothing per step.

    It must be one array (a tuple such as ``(eps, features)`` is refused by name). The shape
    must equal ``x.shape``: a ``(B, 1)`` or scalar output would broadcast into
    silently wrong samples. Any floating dtype is accepted and cast to ``x.dtype``, the
    working precision: wider (float64 eps, float32 x) rounds as the state does anyway; narrower
    (a bfloat16/float16 network in a float32 loop) widens exactly. Integer, bool or complex
    outputs are refused.
    """
    if not (hasattr(eps, "shape") and hasattr(eps, "dtype")):
        what = type(eps).__name__ + (f" of {len(eps)} items" if isinstance(eps, tuple | list)
                                     else "")  # fmt: skip
        raise TypeError(
            f"eps_fn returned a {what}: it must return one array of the input's shape "
            f"{x.shape} (a network that also returns features should give eps alone; "
            "deis_jax reads features through eps_with_features)"
        )
    shape, dtype = jnp.shape(eps), jnp.result_type(eps)
    if shape != x.shape:
        raise ValueError(
            f"eps_fn returned shape {shape} for an input of shape {x.shape}: it must return "
            "eps with exactly the input's shape (no broadcasting: a (B, 1) or scalar output "
            "would silently give wrong samples)"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"eps_fn returned dtype {dtype}: it must return a floating array (cast to the "
            f"state's dtype {x.dtype})"
        )
    return eps if dtype == x.dtype else eps.astype(x.dtype)


def _check_labels(labels, x: jax.Array) -> None:
    """Class labels, when given, are one per row of ``x`` (int ``(B,)``)."""
    if labels is None:
        return
    if jnp.ndim(labels) != 1 or jnp.shape(labels)[0] != x.shape[0]:
        raise ValueError(
            f"labels must hold one class per row of x_T, shape ({x.shape[0]},), got shape "
            f"{jnp.shape(labels)} (index them with the rows: minibatches, shards, chunks)"
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(f"labels must be integer classes, got dtype {jnp.result_type(labels)}")


def run_table(
    eps_fn: EpsFn,
    table: StepTable,
    x: jax.Array,
    key: jax.Array | None = None,
    sample_index: jax.Array | None = None,
    *,
    structure: TableStructure | None = None,
    trajectory: bool = False,
    record: Callable[[jax.Array], Any] | None = None,
    first_eps_scale: float | None = None,
    rule: StepRule | None = None,
    rule_params=None,
    first_step: int = 0,
    labels: jax.Array | None = None,
):
    """Apply every row of ``table`` to ``x`` with one ``lax.scan`` (see ``StepTable``).

    ``structure`` (default: read off ``table``, which must then be concrete) fixes what the
    loop body computes; pass it when ``table`` is traced, e.g. built from a grid under
    ``jax.grad``. With ``trajectory=True`` the result is ``(x_0, states)``, ``states`` of
    shape ``(N + 1, *x.shape)``: the state at every grid point, ``x`` first. With
    ``record`` (a function of a state) the result is ``(x_0, records)``: ``record`` of the
    state after each step, stacked (``N`` leading), e.g. a per-sample finite flag.
    The network's output is checked once, when the loop is traced (:func:`_checked_eps`).

    ``first_eps_scale``: the analytical first step (AFS) -- step 0's first stage makes no
    network call and uses ``eps = first_eps_scale * X`` instead (one NFE saved).
    ``rule`` with ``rule_params``: every row is recomputed on the device by the rule
    (:class:`StepRule`) after the step's first network call. ``first_step``: the global
    index of ``table``'s first row (a rule and AFS see global step numbers; e.g. one
    interval run on its own). ``labels``: the class of every row of ``x`` (int ``(B,)``, a
    class-conditional network; ``deis_jax.sampling.wrappers.eps_of``), passed with every
    network call -- tiled with the rows of the parallel stages' one call.
    """
    if trajectory and record is not None:
        raise ValueError("give trajectory=True or record, not both")
    _check_state(x)
    _check_labels(labels, x)
    keep = (lambda state: state) if trajectory else record
    structure = table_structure(table) if structure is None else structure
    num_stages, history = structure.num_stages, structure.history
    if structure.noisy and key is None:
        raise ValueError("this sampler is stochastic: pass a PRNG key")
    if structure.noisy and sample_index is None:
        sample_index = jnp.arange(x.shape[0])
    active_rule = rule if rule_params is not None else None
    converts = structure.converts or active_rule is not None
    ring_size = history + num_stages if history else 0
    rows = jax.tree.map(lambda a: jnp.asarray(a, dtype=x.dtype), table)
    steps = first_step + jnp.arange(table.num_steps)
    wants_features = active_rule is not None and active_rule.needs_features
    early_rule = active_rule is not None and not wants_features  # called before stage 0

    def network(x_s, t, features=False, rows=labels):
        """``(eps, features)`` of one network call on rows of class ``rows``, the output
        checked (features: None unless asked for); a time per sample (``t`` of shape
        ``(B,)``, AMED's intermediate points) goes through ``call_per_sample`` (the model
        contract: scalar ``t``)."""
        if jnp.ndim(t) == 1:
            return call_per_sample(eps_fn, x_s, t, _checked_eps, rows), None
        if features:
            eps, feats = eps_with_features(eps_fn, x_s, t, rows)
        else:
            eps, feats = eps_of(eps_fn, x_s, t, rows), None
        return _checked_eps(eps, x_s), feats

    def first_call(x_s, t, step):
        """Stage 0's eps (and features): the network, or the analytic AFS value at step 0."""
        call = functools.partial(network, x_s, t, wants_features)
        if first_eps_scale is None:
            return call()

        def analytic():
            eps, feats = jax.eval_shape(call)
            zeros = None if feats is None else jnp.zeros(feats.shape, feats.dtype)
            return (first_eps_scale * x_s).astype(eps.dtype), zeros

        return jax.lax.cond(step == 0, analytic, call)

    def stage_input(row, s, x_k, ks, ring, first_out, z, reads):
        """``X_s`` from ``x_k``, the outputs ``ks`` of stages ``< reads`` and the history."""
        if s == 0:
            x_s = _scaled(row.stage_x[0], x_k) if structure.churn else x_k
        else:
            x_s = _scaled(row.stage_x[s], x_k)
            if ring_size and structure.stage_history:
                unused = jnp.zeros((num_stages - reads,) + row.stage_hist.shape[2:], x_k.dtype)
                lagged = jnp.concatenate([row.stage_k[s, :reads][::-1], row.stage_hist[s], unused])
                x_s = x_s + _ring_sum(ring, lagged, first_out + reads - 1)
            else:
                for l_ in range(reads):
                    x_s = x_s + _scaled(row.stage_k[s, l_], ks[l_])
        if structure.churn:
            x_s = x_s + _scaled(row.stage_noise[s], z)
        return x_s

    def parallel_call(row, inputs):
        """eps of every stage after the first, one network call on their concatenation."""
        batch = inputs[0].shape[0]
        times = [jnp.broadcast_to(row.t[s], (batch,)) for s in range(1, num_stages)]
        rows = None if labels is None else jnp.concatenate([labels] * (num_stages - 1))
        eps, _ = network(jnp.concatenate(inputs), jnp.concatenate(times), rows=rows)
        return jnp.split(eps, num_stages - 1)

    def body(carry, row_and_step):
        x_k, ring = carry
        row, step = row_and_step
        first_out = step * num_stages  # number of this step's first stage output
        z = None
        if structure.noisy:
            z = per_sample_normal(key, sample_index, step, x_k.shape, x_k.dtype)
        if early_rule:
            row = active_rule(rule_params, row, step, x_k, None)
        ks = []

        def keep_stage(s, x_s, eps, ring):
            k_s = _scaled(row.pred_x[s], x_s) + _scaled(row.pred_eps[s], eps) if converts else eps
            ks.append(k_s)
            if ring_size:
                ring = jax.lax.dynamic_update_index_in_dim(ring, k_s, (first_out + s) % ring_size,
                                                           axis=0)  # fmt: skip
            return ring

        x_0 = stage_input(row, 0, x_k, ks, ring, first_out, z, 0)
        eps, feats = first_call(x_0, row.t[0], step)
        if active_rule is not None and not early_rule:
            row = active_rule(rule_params, row, step, x_k, feats)
        ring = keep_stage(0, x_0, eps, ring)
        if structure.parallel and num_stages > 1:
            inputs = [stage_input(row, s, x_k, ks, ring, first_out, z, 1)
                      for s in range(1, num_stages)]  # fmt: skip
            for s, (x_s, eps) in enumerate(zip(inputs, parallel_call(row, inputs), strict=True), 1):
                ring = keep_stage(s, x_s, eps, ring)
        else:
            for s in range(1, num_stages):
                x_s = stage_input(row, s, x_k, ks, ring, first_out, z, s)
                eps, _ = network(x_s, row.t[s])
                ring = keep_stage(s, x_s, eps, ring)
        x_next = _scaled(row.out_x, x_k)
        if ring_size:
            lagged = jnp.concatenate([row.out_k[::-1], row.out_hist])
            x_next = x_next + _ring_sum(ring, lagged, first_out + num_stages - 1)
        else:
            for s in range(num_stages):
                x_next = x_next + _scaled(row.out_k[s], ks[s])
        if structure.noisy:
            x_next = x_next + _scaled(row.out_noise, z)
        return (x_next, ring), (None if keep is None else keep(x_next))

    ring0 = jnp.zeros((ring_size,) + x.shape, x.dtype)
    (x_out, _), records = jax.lax.scan(body, (x, ring0), (rows, steps))
    if trajectory:
        return x_out, jnp.concatenate([x[None], records], axis=0)
    return x_out if record is None else (x_out, records)


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingPlan:
    """A method on a time grid, with no model: everything :func:`sample` needs but ``eps_fn``.

    ``ts`` is the float64 grid, ``table`` the float64 coefficients (``final_table`` the
    optional Tweedie step), ``nfe`` the exact number of ``eps_fn`` calls per sample. A plan is
    built once (:func:`make_plan`) and run with any network: ``sample(plan, eps_fn, x_T)``.
    Plans hash by identity, so one can be a static argument of ``jax.jit``.

    ``afs``: the analytical first step (the first network call is replaced by
    ``eps = x / sqrt(alpha^2 + sigma^2)`` at ``ts[0]``, one NFE saved). ``rule``: the method
    computes its coefficients on the device from learned parameters (:class:`StepRule`, e.g.
    AMED); ``table`` is then what the rule gives with neutral parameters (AMED: ``r = 1/2``).
    """

    schedule: NoiseSchedule
    method: str
    order: int
    ts: np.ndarray
    table: StepTable
    final_table: StepTable | None
    options: dict
    afs: bool = False
    rule: StepRule | None = None

    @property
    def nfe(self) -> int:
        final = self.final_table.nfe if self.final_table is not None else 0
        return self.table.nfe - int(self.afs) + final

    @property
    def parallel_nfe(self) -> int:
        """Sequential rounds of network calls per sample: :attr:`nfe` for every method but
        those whose stages after the first run as one call (EPD: 2 per step, however many
        probes), the latency on an accelerator that batches a call at no extra cost."""
        if not self.structure.parallel or self.table.num_stages == 1:
            return self.nfe
        final = self.final_table.nfe if self.final_table is not None else 0
        return 2 * self.table.num_steps - int(self.afs) + final

    @property
    def first_eps_scale(self) -> float | None:
        """AFS: ``eps = scale * x_T`` with ``scale = 1 / sqrt(alpha^2 + sigma^2)`` at ``ts[0]``
        (the eps of standard normal data: x_T / sigma for VE at large sigma, x_T for VP)."""
        if not self.afs:
            return None
        t = np.float64(self.ts[0])
        alpha, sigma = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        return 1.0 / math.sqrt(alpha**2 + sigma**2)

    @property
    def num_steps(self) -> int:
        return self.table.num_steps

    @property
    def structure(self) -> TableStructure:
        return table_structure(self.table, self.rule)

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
    record: Callable[[jax.Array], Any] | None = None,
    rule_params: RuleParams | None = None,
    check_finite: bool = False,
    labels: jax.Array | None = None,
):
    """Integrate ``x_T`` from ``plan.ts[0]`` to ``plan.ts[-1]`` with the network ``eps_fn``.

    Pure and jittable: ``jax.jit(sample, static_argnums=0)(plan, eps_fn, x_T)``. The model is
    an argument: pass ``eps_fn`` as a pytree (``eps_fn_from_model`` of a
    ``jax.tree_util.Partial(apply, params)``) and its parameters are arguments of the
    compiled function, not constants baked into it. ``table`` replaces ``plan.table`` by one of
    the same structure (e.g. ``plan.build_table(ts)`` traced from a grid being fitted).
    The noise of row i is keyed by its global sample index: ``sample_index[i]`` when given
    (rows in any order, e.g. a shard of a sharded batch), else ``index_offset + i``.
    ``trajectory=True`` also returns the states at the grid points (see :func:`run_table`);
    ``record`` returns ``(x, records)``, ``record`` of the state after every step, the final
    denoising step included (``plan.num_steps`` rows, one more with ``final_table``).
    ``rule_params``: the learned parameters of ``plan.rule`` (e.g. a trained AMED
    predictor) as a :class:`~deis_jax.sampling.rule_params.RuleParams`, refused when trained
    for other settings (named); None runs ``plan.table`` as it is (AMED: the base solver,
    ``r = 1/2``). ``labels``: a class-conditional network's class of every row of ``x_T``
    (int ``(B,)``), passed with every network call (:func:`run_table`); None: unconditional.

    ``check_finite=True`` raises :class:`NonFiniteSamplesError` naming the samples that came
    back NaN/Inf and the first step at which each did (found by rerunning just those rows
    with :func:`first_nonfinite_step`), and ``ValueError`` naming the rows of ``x_T`` that
    are not finite. It needs concrete arrays: call ``sample`` itself outside ``jax.jit`` (its
    loop is compiled all the same). It is off by default because it waits for the samples and
    brings a flag per sample to the host, which a jitted pipeline must not do; the modes of
    ``main.py`` always check, and refuse to write non-finite samples.
    """
    if check_finite:
        return _checked_sample(plan, eps_fn, x_T, key, index_offset, sample_index, table,
                               trajectory, record, rule_params, labels)  # fmt: skip
    structure = plan.structure
    if key is not None and sample_index is None:
        sample_index = index_offset + jnp.arange(x_T.shape[0])
    params = checked_rule_params(plan, rule_params)
    table = plan.table if table is None else table
    out = run_table(eps_fn, table, x_T, key, sample_index, structure=structure,
                    trajectory=trajectory, record=record, first_eps_scale=plan.first_eps_scale,
                    rule=plan.rule, rule_params=params, labels=labels)  # fmt: skip
    x, extra = out if trajectory or record is not None else (out, None)
    if plan.final_table is not None and record is None:
        x = run_table(eps_fn, plan.final_table, x, labels=labels)
    elif plan.final_table is not None:
        x, last = run_table(eps_fn, plan.final_table, x, record=record, labels=labels)
        extra = jnp.concatenate([extra, last])
    return x if extra is None else (x, extra)


def _concrete_rows(x, name: str) -> np.ndarray:
    """Indices of the non-finite rows of ``x``; ``TypeError`` when ``x`` is traced."""
    try:
        return nonfinite_samples(x)
    except jax.errors.JAXTypeError:
        raise TypeError(
            f"sample(..., check_finite=True) needs concrete arrays, but {name} is traced: "
            "call sample outside jax.jit (its loop is compiled anyway), or check the result "
            "with deis_jax.nonfinite_samples"
        ) from None


def _checked_sample(plan, eps_fn, x_T, key, index_offset, sample_index, table, trajectory,
                    record, rule_params, labels):  # fmt: skip
    """:func:`sample` with ``check_finite=True`` (see there)."""
    bad_inputs = _concrete_rows(x_T, "x_T")
    if bad_inputs.size:
        raise ValueError(f"x_T is not finite (NaN or Inf) in rows {shown(bad_inputs)}")
    out = sample(
        plan,
        eps_fn,
        x_T,
        key,
        index_offset=index_offset,
        sample_index=sample_index,
        table=table,
        trajectory=trajectory,
        record=record,
        rule_params=rule_params,
        labels=labels,
    )
    x = out[0] if trajectory or record is not None else out
    bad = _concrete_rows(x, "the samples")
    if bad.size:
        index = index_offset + jnp.arange(x_T.shape[0]) if sample_index is None else sample_index
        steps = first_nonfinite_step(plan, eps_fn, x_T[bad], key,
                                     sample_index=jnp.asarray(index)[bad],
                                     rule_params=rule_params,
                                     labels=None if labels is None else labels[bad])  # fmt: skip
        raise NonFiniteSamplesError(bad, steps)
    return out


def first_nonfinite_step(
    plan: SamplingPlan,
    eps_fn: EpsFn,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    index_offset: int = 0,
    sample_index: jax.Array | None = None,
    rule_params: RuleParams | None = None,
    labels: jax.Array | None = None,
) -> np.ndarray:
    """Per sample, the first step whose result is non-finite, or -1 if none is.

    Step ``k`` maps ``plan.ts[k]`` to ``plan.ts[k + 1]``; ``plan.num_steps`` is the final
    denoising step (with ``final_denoise``). The arguments are those of :func:`sample` (same
    ``key``, sample indices and labels: the same noise and classes), which is rerun with a
    finite flag per sample recorded after every step (``diagnostics.finite_rows``) -- one
    extra sampling pass, for diagnosis only. To diagnose a few rows of a batch, pass those
    rows of ``x_T`` with their ``sample_index`` (and ``labels``).

    Raises:
      ValueError: if ``x_T`` itself has non-finite rows (named).
    """
    bad_inputs = nonfinite_samples(x_T)
    if bad_inputs.size:
        raise ValueError(f"x_T is not finite in rows {shown(bad_inputs)}: nothing to diagnose")
    _, finite = sample(plan, eps_fn, x_T, key, index_offset=index_offset,
                       sample_index=sample_index, record=finite_rows,
                       rule_params=rule_params, labels=labels)  # fmt: skip
    finite = np.asarray(finite)  # (steps, B)
    return np.where(finite.all(axis=0), -1, np.argmin(finite, axis=0)).astype(np.int64)


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
    afs: bool = False,
    nfe_rounding: str = "exact",
    parallel_nfe: int | None = None,
    **options,
) -> SamplingPlan:
    """Build a :class:`SamplingPlan`.

    Either give an explicit decreasing grid ``ts`` or an NFE budget ``nfe`` with a grid kind
    (``deis_jax.sampling.timesteps.GRID_KINDS``; None = the method's default grid),
    ``grid_power`` (kinds ``time`` and ``rho`` only) and the interval ``[t0, t1]`` (schedule
    defaults when None). ``options`` are method-specific (e.g. ``tableau`` for ``rhork``).
    The method's spec checks the order, the options and the NFE (``MethodSpec.check``, an NFE
    at most ``MAX_NFE``); ``ts`` together with any of ``nfe``/``grid``/``grid_power``/
    ``t0``/``t1`` is refused (they would be ignored). A bad argument raises ``ValueError``
    naming it (``MethodArgumentError``).

    **Budgets are spent exactly.** ``nfe`` counts every network call: a method spending S
    per step takes N steps for ``S N`` NFE; ``afs=True`` (deterministic methods) replaces the
    first network call by its analytic value (:attr:`SamplingPlan.first_eps_scale`), one NFE
    less in all; ``final_denoise`` adds one. A budget the method cannot spend (AMED-Plugin
    with AFS spends odd NFE only) is refused at once, naming the budgets it can
    (``MethodSpec.num_steps``). ``nfe_rounding="up"`` instead runs the fewest steps that
    spend at least ``nfe`` -- the convention of the DEIS paper's tables for Runge-Kutta
    rows, used by the experiment modes that sweep one budget list over many methods; the
    plan's :attr:`SamplingPlan.nfe` always says what it spends.

    ``parallel_nfe`` instead of ``nfe`` states the budget in sequential rounds of network
    calls (:attr:`SamplingPlan.parallel_nfe`; EPD's papers count so, its K probes one round);
    giving both is refused: the name says which count a budget is.
    """
    check_schedule(schedule)
    spec = solvers.get_method(method)
    for name, flag in (("final_denoise", final_denoise), ("afs", afs)):
        if not isinstance(flag, bool | np.bool_):
            raise solvers.MethodArgumentError(name, f"must be True or False, got {flag!r}")
    order = spec.check(order, options, final_denoise=final_denoise)
    if ts is not None:
        grid_args = {
            "nfe": nfe,
            "grid": grid,
            "grid_power": grid_power,
            "t0": t0,
            "t1": t1,
            "nfe_rounding": None if nfe_rounding == "exact" else nfe_rounding,
        }
        ignored = [name for name, value in grid_args.items() if value is not None]
        if ignored:
            raise solvers.MethodArgumentError(
                ignored[0],
                f"conflicts with the explicit grid ts (which fixes the steps and the interval "
                f"[ts[-1], ts[0]]): give either ts or {'/'.join(grid_args)}, not both "
                f"(got ts and {', '.join(ignored)})",
            )
    if nfe is not None and parallel_nfe is not None:
        raise solvers.MethodArgumentError(
            "parallel_nfe", f"conflicts with nfe: state the budget once, as nfe (network "
            f"evaluations per sample) or parallel_nfe (sequential rounds), got both "
            f"(nfe={nfe!r}, parallel_nfe={parallel_nfe!r})")  # fmt: skip
    if ts is not None and parallel_nfe is not None:
        raise solvers.MethodArgumentError(
            "parallel_nfe", "conflicts with the explicit grid ts: give either ts or a budget"
        )
    if ts is None:
        parallel = parallel_nfe is not None
        nfe = spec.check_nfe(parallel_nfe if parallel else nfe, order)
        num_steps = spec.num_steps(nfe, order, options, afs=afs, final_denoise=final_denoise,
                                   rounding=nfe_rounding, parallel=parallel)  # fmt: skip
        grid = spec.default_grid if grid is None else grid
        ts = time_grid(schedule, num_steps, grid, power=grid_power, t0=t0, t1=t1)
    else:
        validate_grid(schedule, ts)
        ts = np.asarray(ts, dtype=np.float64)
    table = spec.build(schedule, ts, order, **options)
    if afs and np.any(np.asarray(table.out_noise) != 0):
        raise solvers.MethodArgumentError(
            "afs", f"is for deterministic methods; {method!r} adds noise (use afs=False)"
        )
    rule = None if spec.rule is None else spec.rule(schedule, ts, order, **options)
    final = final_denoise_table(schedule, float(ts[-1])) if final_denoise else None
    return SamplingPlan(schedule, method, order, ts, table, final, dict(options), bool(afs), rule)


def _plan_field(name: str) -> property:
    return property(lambda self: getattr(self.plan, name), doc=f"``plan.{name}``")


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A plan bound to a network: a jittable ``x_T -> x_0`` map (``get_sampler``'s result).

    Exposes the plan's fields (``ts``, ``table``, ``nfe``, ...) for benchmarks and tests.
    """

    plan: SamplingPlan
    eps_fn: EpsFn
    rule_params: object = None

    schedule = _plan_field("schedule")
    method = _plan_field("method")
    order = _plan_field("order")
    ts = _plan_field("ts")
    table = _plan_field("table")
    final_table = _plan_field("final_table")
    options = _plan_field("options")
    nfe = _plan_field("nfe")
    parallel_nfe = _plan_field("parallel_nfe")
    num_steps = _plan_field("num_steps")
    stochastic = _plan_field("stochastic")

    def __call__(
        self,
        x_T: jax.Array,
        key: jax.Array | None = None,
        index_offset: int | jax.Array = 0,
        sample_index: jax.Array | None = None,
        labels: jax.Array | None = None,
    ) -> jax.Array:
        """``sample(self.plan, self.eps_fn, x_T, key, ...)`` (``labels``: the rows' classes,
        a class-conditional network)."""
        return sample(self.plan, self.eps_fn, x_T, key, index_offset=index_offset,
                      sample_index=sample_index, rule_params=self.rule_params,
                      labels=labels)  # fmt: skip


def get_sampler(schedule: NoiseSchedule, eps_fn: EpsFn, ts=None, **plan_args) -> Sampler:
    """``Sampler(make_plan(schedule, ts, **plan_args), eps_fn)``: a plan bound to a network
    (see :func:`make_plan` for the arguments)."""
    return Sampler(make_plan(schedule, ts, **plan_args), eps_fn)
