"""Training: optax Adam with warm-up and clipping, parameter EMA, data parallel, orbax checkpoints.

score_sde's recipe: Adam (b1 0.9, b2 0.999, eps 1e-8), learning rate ``lr * min(step /
warmup, 1)``, global-norm gradient clipping, and an EMA of the parameters (updated after every
step, used for sampling). Data parallelism is ``jax.jit`` over a one-axis ``jax.make_mesh``
mesh ``('data',)`` spanning every device: the batch is sharded ``P('data')``, the state is
replicated ``P()``, and XLA inserts the gradient all-reduce (no pmap).

Resumability: the batch at step ``s`` is ``dataset[s]`` and the step's randomness is
``fold_in(PRNGKey(seed), s)`` (times, noise, dropout), so a run restored from the checkpoint at
step ``s`` computes exactly the losses an uninterrupted run computes from ``s`` on.

Checkpoints are trusted only after a check (orbax restores a bit-flipped checkpoint without
complaint): :func:`save_checkpoint` records the sha256 of every file of a step folder and the
run's identity in ``<step>/deis_integrity.json``; :func:`restore_state` restores the newest
checkpoint whose files match, moving damaged newer ones aside with a warning, and refuses one
written by another run. :func:`trim_metrics` keeps ``metrics.jsonl`` at one record per logged
step across restarts.

The network of a config is built by ``deis_jax.models.loading.build_model``; ``--mode=train``
(``deis_jax.modes.train``) puts the pieces together.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deis_jax.common import parallel
from deis_jax.common.checks import first_line
from deis_jax.common.files import atomic_write_bytes, atomic_write_text, move_aside, sha256_file
from deis_jax.common.identity import describe_differences
from deis_jax.common.parallel import make_mesh  # noqa: F401  (re-exported: the one mesh helper)
from deis_jax.common.progress import Rate
from deis_jax.sampling import wrappers
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.training import losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    ema_params: Any


# --- optimizer and state ------------------------------------------------------------------


def make_optimizer(
    lr: float = 2e-4, warmup: int = 5000, grad_clip: float = 1.0, beta1: float = 0.9
) -> optax.GradientTransformation:
    """Adam with linear warm-up from 0 (score_sde: ``lr * min(step / warmup, 1)``) and
    global-norm clipping (off when ``grad_clip <= 0``)."""
    schedule = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
    adam = optax.adam(schedule, b1=beta1, b2=0.999, eps=1e-8)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adam) if grad_clip > 0 else adam


def optimizer_from_config(training_config) -> optax.GradientTransformation:
    return make_optimizer(training_config.lr, training_config.warmup, training_config.grad_clip)


def init_state(model: nn.Module, tx, key: jax.Array, input_shape: tuple[int, ...]) -> TrainState:
    """Initialise parameters with a dummy batch ``(1, *input_shape)``; EMA starts at them."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    labels = jnp.ones((1,), jnp.float32)
    params = model.init({"params": key, "dropout": key}, x, labels, train=False)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), params)


def apply_fn(model: nn.Module, params, *, train: bool) -> Callable:
    """``f(x, labels, key)`` calling the Flax model; ``key`` feeds dropout when training."""

    def f(x, labels, key=None):
        rngs = {"dropout": key} if (train and key is not None) else None
        return model.apply({"params": params}, x, labels, train=train, rngs=rngs)

    return f


# --- the step -----------------------------------------------------------------------------


def make_train_step(
    model: nn.Module,
    schedule: NoiseSchedule,
    tx: optax.GradientTransformation,
    *,
    prediction: str,
    seed: int,
    ema_rate: float = 0.9999,
    ema_warmup: bool = False,
    eps: float = 1e-5,
    reduce_mean: bool = True,
    likelihood_weighting: bool = False,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
    """A pure ``step(state, batch) -> (state, metrics)``; randomness from ``(seed, step)``.

    The EMA decay is ``ema_rate`` (score_sde), or with ``ema_warmup``
    ``min(ema_rate, (1 + k) / (10 + k))`` after ``k`` updates, so that short runs do not keep
    a large share of the initial weights in the average.
    """
    base_key = jax.random.PRNGKey(seed)

    def step(state: TrainState, batch: jax.Array):
        key = jax.random.fold_in(base_key, state.step)

        def loss_fn(params):
            eps_model = wrappers.eps_fn_from_model(
                apply_fn(model, params, train=True), schedule, prediction
            )
            loss, _ = losses.dsm_loss(
                eps_model,
                schedule,
                batch,
                key,
                eps=eps,
                reduce_mean=reduce_mean,
                likelihood_weighting=likelihood_weighting,
            )
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = jnp.asarray(ema_rate, jnp.float32)
        if ema_warmup:
            k = state.step.astype(jnp.float32)
            decay = jnp.minimum(decay, (1.0 + k) / (10.0 + k))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        new_state = TrainState(state.step + 1, params, opt_state, ema)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


# --- devices ------------------------------------------------------------------------------


def shard_step(step_fn, mesh: jax.sharding.Mesh):
    """jit ``step_fn`` with the batch sharded over ``'data'`` and the state replicated."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step_fn,
        in_shardings=(replicated, NamedSharding(mesh, P("data"))),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def global_batch(local_batch: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """This process's rows of the batch -> one global array sharded over ``'data'``."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_batch)


# --- checkpoints --------------------------------------------------------------------------

INTEGRITY_FILE = "deis_integrity.json"  # in each step folder: file digests, run identity


def _not_orbax_info(record) -> bool:
    return record.levelno >= pylogging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logs() -> None:
    """Orbax logs each save/restore in detail at INFO; keep only its warnings and errors."""
    handler = logging.get_absl_handler()
    if _not_orbax_info not in handler.filters:
        handler.addFilter(_not_orbax_info)


def checkpoint_manager(directory: str, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    quiet_orbax_logs()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class CheckpointError(RuntimeError):
    """No checkpoint of a directory can be restored, or the one found belongs to another run."""


def step_folder(mngr: ocp.CheckpointManager, step: int) -> str:
    """The folder of checkpoint ``step``."""
    return os.path.join(str(mngr.directory), str(step))


def save_checkpoint(
    mngr: ocp.CheckpointManager, step: int, state: TrainState, identity: dict | None = None
) -> None:
    """Save ``state`` as checkpoint ``step``, wait until it is written, then record the sha256
    of every file of its folder and the run's ``identity`` (JSON-able) in
    ``<step>/deis_integrity.json`` (process 0). The wait makes saving synchronous: the
    digests are of the files as orbax finished them."""
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    if jax.process_index() == 0:
        folder = step_folder(mngr, step)
        record = {"files": folder_digests(folder), "identity": identity}
        atomic_write_text(os.path.join(folder, INTEGRITY_FILE), json.dumps(record, indent=1))


def folder_digests(folder: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` but the integrity record."""
    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != INTEGRITY_FILE:
                digests[rel] = sha256_file(os.path.join(root, name))
    return dict(sorted(digests.items()))


def _integrity(folder: str) -> tuple[str | None, dict | None]:
    """``(problem, record)`` of a checkpoint folder: ``problem`` says why it is damaged (None:
    every file matches its recorded digest, or there is no record to check against)."""
    path = os.path.join(folder, INTEGRITY_FILE)
    if not os.path.exists(path):
        return None, None
    try:
        with open(path) as f:
            record = json.load(f)
        files = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {INTEGRITY_FILE} is unreadable ({type(err).__name__})", None
    found = folder_digests(folder)
    for rel in sorted(set(files) | set(found)):
        if rel not in found:
            return f"file {rel} is missing", record
        if rel not in files:
            return f"unexpected file {rel}", record
        if found[rel] != files[rel]:
            return f"file {rel} does not match its recorded sha256", record
    return None, record


def restore_state(
    mngr: ocp.CheckpointManager,
    target: TrainState,
    step: int | None = None,
    identity: dict | None = None,
) -> TrainState | None:
    """Restore into the structure/shardings of ``target``: checkpoint ``step``, by default the
    newest intact one (None when there is no checkpoint).

    A checkpoint is intact when every file matches the sha256 recorded when it was saved
    (:func:`save_checkpoint`; one saved without a record is trusted if orbax restores it).
    Damaged checkpoints newer than the one restored are moved aside
    (``<step>.damaged-<time>``) with a warning naming them, so that training resumes from
    the newest intact step and saves over none of them.
    ``CheckpointError`` (naming the directory and each step's problem) when no checkpoint can
    be restored -- nothing is moved then -- when ``step`` is damaged, when an intact
    checkpoint does not fit ``target`` (another model), or when its recorded identity differs
    from ``identity`` (another run: the message lists the differing fields)."""
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    damaged: list[tuple[int, str, str]] = []
    for s in steps:
        folder = step_folder(mngr, s)
        problem, record = _integrity(folder)
        if problem is None and record is not None and identity is not None:
            diffs = describe_differences(record.get("identity") or {}, identity)
            if diffs:
                raise CheckpointError(
                    f"checkpoint {folder} was written by another run ({'; '.join(diffs)}); "
                    f"use another --workdir, or move {mngr.directory} away to start over"
                )
        if problem is None:
            try:
                state = mngr.restore(s, args=ocp.args.StandardRestore(abstract))
            except Exception as err:  # orbax/tensorstore raise many kinds on a damaged folder
                reason = first_line(err)
                if record is not None:
                    raise CheckpointError(
                        f"checkpoint {folder} is intact but cannot be restored into this model "
                        f"({reason}); check config.model, or use another --workdir"
                    ) from err
                problem = f"no {INTEGRITY_FILE} and restoring it failed ({reason})"
            else:
                _set_aside(mngr, damaged, s)
                return state
        damaged.append((s, folder, problem))
    if not damaged:
        return None
    raise _none_restorable(mngr.directory, damaged)


def _none_restorable(directory, damaged: list) -> CheckpointError:
    """The error when every checkpoint is ``damaged`` (``(step, folder, problem)`` each)."""
    listing = "; ".join(f"step {s}: {p}" for s, _, p in damaged)
    return CheckpointError(
        f"no checkpoint in {directory} can be restored ({listing}); restore them from a "
        f"backup, or move the folder away to start training from scratch"
    )


def restorable_metadata(
    directory: str, check: Callable[[str, Any], None] | None = None
) -> tuple[str, Any] | None:
    """What :func:`restore_state` would restore from ``directory``, judged before any network
    is built: ``(folder, Orbax metadata tree of its state)`` of the newest checkpoint whose
    files match their recorded sha256 (read once here and again when restored) or, without
    a record, whose metadata reads; ``check(folder, tree)`` raises ``ValueError`` when the
    state does not fit the model. None: no checkpoint. ``CheckpointError`` as
    :func:`restore_state` raises it: an intact checkpoint that does not fit, or every
    checkpoint damaged (each step's problem listed). Nothing is moved."""
    quiet_orbax_logs()
    mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers=ocp.StandardCheckpointHandler(),  # to read the metadata of a save
    )
    try:
        damaged: list[tuple[int, str, str]] = []
        for s in sorted(mngr.all_steps(), reverse=True):
            folder = step_folder(mngr, s)
            problem, record = _integrity(folder)
            if problem is None:
                try:
                    tree = mngr.item_metadata(s).tree
                    if check is not None:
                        check(folder, tree)
                    return folder, tree
                except Exception as err:  # orbax raises many kinds on a damaged folder
                    if record is not None:
                        raise CheckpointError(
                            f"checkpoint {folder} is intact but cannot be restored into this "
                            f"model ({first_line(err)}); check config.model, or use another "
                            f"--workdir"
                        ) from err
                    problem = f"no {INTEGRITY_FILE} and its metadata is unreadable or does not "
                    problem += f"fit the model ({first_line(err)})"
            damaged.append((s, folder, problem))
        if damaged:
            raise _none_restorable(mngr.directory, damaged)
        return None
    finally:
        mngr.close()


def _set_aside(mngr: ocp.CheckpointManager, damaged: list, restored: int) -> None:
    """Move the ``damaged`` ``(step, folder, problem)`` aside (process 0), warning for each."""
    if not damaged:
        return
    for s, folder, problem in damaged if jax.process_index() == 0 else ():
        logging.warning(
            "checkpoint step %d (%s) is damaged: %s; moved aside to %s; restored step %d",
            s, folder, problem, move_aside(folder, "damaged"), restored,
        )  # fmt: skip
    parallel.barrier("deis_jax.restore_state")
    mngr.reload()


def trim_metrics(path: str, step: int) -> int:
    """Drop from the JSON-lines log ``path`` every record logged after ``step`` (written by a
    run killed after its last checkpoint; the run resumed from ``step`` logs them again) and
    every unreadable line; returns how many lines were dropped (the file is rewritten
    atomically only then)."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a torn or garbled line (JSON or UTF-8 error)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            if record["step"] <= step:
                kept.append(line)
    if len(kept) != len(lines):
        atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
    return len(lines) - len(kept)


# --- the loop -----------------------------------------------------------------------------


def train_loop(
    state: TrainState,
    step_fn: Callable,
    batches: Iterator[jax.Array],
    *,
    num_steps: int,
    log_every: int = 100,
    checkpoint_every: int = 10_000,
    mngr: ocp.CheckpointManager | None = None,
    metrics_path: str | None = None,
    callback: Callable[[int, dict], None] | None = None,
    identity: dict | None = None,
) -> tuple[TrainState, list[dict]]:
    """Run ``state.step .. num_steps - 1``; log means over each window, checkpoint every
    ``checkpoint_every`` updates and at the end (:func:`save_checkpoint` with ``identity``).
    ``callback(step, metrics)`` (host values) runs after every step when given (tests use it
    to record or interrupt). Returns the final state and the logged records.

    A window's record averages the steps run since the previous record of this process: after
    a resume from a checkpoint that is not on a ``log_every`` boundary the first window is
    shorter than in an uninterrupted run. A non-finite loss or gradient norm stops training
    with :class:`TrainingDivergedError` before it is logged or checkpointed (the last
    checkpoint is kept)."""
    start = int(state.step)
    history: list[dict] = []
    window: list[dict] = []
    rate, t_window = Rate(num_steps, start), time.perf_counter()
    for step in range(start, num_steps):
        state, metrics = step_fn(state, next(batches))
        window.append(metrics)
        if step == start:  # the first step includes compilation: start the clock after it
            jax.block_until_ready(metrics)
            rate.restart(start + 1)
        if callback is not None:
            callback(step, jax.tree.map(float, metrics))
        done = step + 1
        save = mngr is not None and (done % checkpoint_every == 0 or done == num_steps)
        if done % log_every == 0 or done == num_steps:
            means = _finite_means(window, done, mngr)
            now, per_second = time.perf_counter(), rate.per_second(done)
            record = {"step": done, **means, "steps_per_sec": per_second,
                      "window_sec": now - t_window}  # fmt: skip
            history.append(record)
            logging.info(
                "step %d/%d  loss %.5f  grad_norm %.3f  %.2f steps/s  ETA %s",
                done, num_steps, means["loss"], means["grad_norm"], per_second, rate.eta(done),
            )  # fmt: skip
            if metrics_path is not None and jax.process_index() == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            window, t_window = [], now
        elif save:
            _finite_means(window, done, mngr)
        if save:
            save_checkpoint(mngr, done, state, identity)
    if mngr is not None:
        mngr.wait_until_finished()
    return state, history


class TrainingDivergedError(FloatingPointError):
    """A non-finite loss or gradient norm: training stops before logging or saving it."""


def _finite_means(window: list[dict], done: int, mngr) -> dict[str, float]:
    """The window's mean of each metric; :class:`TrainingDivergedError` if one is not finite."""
    means = {k: float(jnp.mean(jnp.stack([m[k] for m in window]))) for k in window[0]}
    bad = {k: v for k, v in means.items() if not np.isfinite(v)}
    if bad:
        last = mngr.latest_step() if mngr is not None else None
        raise TrainingDivergedError(
            f"training diverged: mean {bad} over the steps before step {done}; nothing of it "
            f"was logged or checkpointed (latest checkpoint: step {last}); lower "
            f"config.training.lr or raise config.training.warmup and resume"
        )
    return means
