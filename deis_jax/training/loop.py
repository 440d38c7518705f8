"""Training: optax Adam with warm-up and clipping, parameter EMA, data parallel, orbax checkpoints.

score_sde's recipe: Adam (b1 0.9, b2 0.999, eps 1e-8), learning rate ``lr * min(step /
warmup, 1)``, global-norm gradient clipping, and an EMA of the parameters (updated after every
step, used for sampling). Data parallelism is ``jax.jit`` over a one-axis ``jax.make_mesh``
mesh ``('data',)`` spanning every device: the batch is sharded ``P('data')``, the state is
replicated ``P()``, and XLA inserts the gradient all-reduce (no pmap).

Resumability: the batch at step ``s`` is ``dataset[s]`` and the step's randomness is
``fold_in(PRNGKey(seed), s)`` (times, noise, dropout), so a run restored from the checkpoint at
step ``s`` computes exactly the losses an uninterrupted run computes from ``s`` on.

Checkpoints are integrity-checked Orbax checkpoints (``deis_jax.common.checkpoint_store``);
:func:`trim_metrics` keeps ``metrics.jsonl`` at one record per logged step across restarts.

The network of a config is built by ``deis_jax.models.loading.build_model``; ``--mode=train``
(``deis_jax.experiments.train``) puts the pieces together.
"""

from __future__ import annotations

import json
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

from deis_jax.common.checkpoint_store import save_checkpoint
from deis_jax.common.files import atomic_write_bytes
from deis_jax.common.parallel import make_mesh  # noqa: F401  (re-exported: the one mesh helper)
from deis_jax.common.precision import DEFAULT_DTYPE, cast_params
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
    """``f(x, labels, key)`` calling the Flax model; ``key`` feeds dropout when training.

    ``params`` are the float32 master weights; the forward pass uses their copy in the
    model's compute dtype (``deis_jax.common.precision.cast_params``), so the gradients, the
    optimiser state and the EMA stay float32 (the cast's gradient is the widening one)."""
    compute = cast_params(params, getattr(model, "dtype", DEFAULT_DTYPE))

    def f(x, labels, key=None):
        rngs = {"dropout": key} if (train and key is not None) else None
        return model.apply({"params": compute}, x, labels, train=train, rngs=rngs)

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
