"""The Adam loop shared by the learned samplers (LD3's grid, AMED's predictor), resumable.

**Loop.** :func:`fit_adam` runs ``steps`` updates of Adam (optax) after clipping the global
gradient norm to ``clip_norm``; the learning rate decays from ``learning_rate`` to
``final_lr_fraction * learning_rate`` along a cosine over the ``steps`` updates (1.0:
constant). Update ``k`` (0-based) takes the next index batch of
:class:`_Batches` (shuffled passes over the ``num_train`` training rows from
``PRNGKey(seed)``, dropping a short last batch; all rows every time when ``batch_size`` is None
or not below ``num_train``) and calls ``loss_and_grads(params, idx) -> (loss, aux, grads)``: the
mean training loss on the rows ``idx``, anything the caller wants back (``aux``) and the
gradient of ``loss`` in ``params``. An update whose loss or gradient is not finite is skipped
(logged and counted; its ``train_loss`` entry is NaN). After a successful update,
``after_update(k, idx, aux, new_params)`` runs (LD3's soft teacher). The validation loss
``val_loss(params)`` is evaluated at the initial parameters and after every ``eval_every``
updates; ``patience`` evaluations in a row without improvement (or with a non-finite value)
stop the loop. The parameters with the best validation loss are returned -- never worse than
the initial ones on the validation set. ``callback(k, train_loss, val_loss_or_None)`` runs at
the end of every update. Every ~10% of ``steps`` a line with the step, the losses, the rate and
the ETA is logged (INFO); ``progress(n)`` (e.g. a tqdm bar's ``update``) is advanced by 1 per
update.

**Resuming.** With ``state_path`` set, the whole loop state -- the current and the best
parameters, the optimizer state, the best validation loss and its step, the curves, the
counters, the batch sampler's key/order/position, the step, and the caller's own state through
``extra_state`` (e.g. LD3's moved latents and their step size) -- is written atomically every
``checkpoint_every`` updates and at the end. A later call with the same ``state_fingerprint``
(a caller-chosen string naming what is fitted: model, data, method...) and the same loop
settings starts from that state, and its result is bitwise that of an uninterrupted run
(``steps`` may grow between the calls when the rate is constant: a finished 10-step state
continues to 20; a decaying rate depends on ``steps``, which then must match). A file that
cannot be read (torn, corrupt, another format), was written for another fingerprint or other
settings, or has more updates than ``steps``, is ignored with a warning and the fit starts over
(and overwrites it). The file holds a sha256 of its msgpack payload (``flax.serialization``),
numpy leaves only: no pickle.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from deis_jax.common.files import atomic_write_bytes
from deis_jax.common.progress import Rate, format_duration

logger = logging.getLogger(__name__)

LossAndGrads = Callable[[Any, np.ndarray], tuple[Any, Any, Any]]
"""``loss_and_grads(params, idx) -> (loss, aux, grads)``: see :func:`fit_adam`."""

_MAGIC = b"deis_jax.adam_loop state v1\n"
_DIGEST = hashlib.sha256().digest_size


class LoopResult(NamedTuple):
    """What :func:`fit_adam` found.

    ``params``: the parameters with the best validation loss (the initial ones when no update
    improved on them), leaves as JAX arrays. ``train_loss[k]``: the minibatch loss before
    update ``k`` (NaN for a skipped update); ``val_loss``: the validation loss at each
    evaluation after an update; ``best_step``: the number of updates behind ``params`` (0 = the
    init); ``init_val_loss``/``best_val_loss``: the validation loss of the initial and of the
    returned parameters; ``seconds``: wall time, summed over the runs of a resumed fit;
    ``skipped_steps``: updates skipped for a non-finite loss or gradient; ``resumed_step``: the
    number of updates restored from ``state_path`` (0 when the fit started from scratch).
    """

    params: Any
    train_loss: list[float]
    val_loss: list[float]
    best_step: int
    init_val_loss: float
    best_val_loss: float
    seconds: float
    skipped_steps: int
    resumed_step: int


class ExtraState(NamedTuple):
    """The caller's own resumable state: ``get()`` returns a tree of dicts (string keys),
    lists, numpy arrays and Python scalars; ``set(state)`` restores what ``get`` returned
    (arrays come back read-only: copy before writing into them)."""

    get: Callable[[], Any]
    set: Callable[[Any], None]


class _Batches:
    """Index batches: shuffled passes over ``n`` samples (dropping a short last batch, so
    every batch has the same shape), or the full set every time."""

    def __init__(self, n: int, batch_size: int | None, seed: int):
        self.n = n
        self.size = n if batch_size is None or batch_size >= n else int(batch_size)
        self.full = self.size == n
        self.key = jax.random.PRNGKey(seed)
        self.order = np.arange(n)
        self.pos = n

    def next(self) -> np.ndarray:
        if self.full:
            return self.order
        if self.pos + self.size > self.n:
            self.key, sub = jax.random.split(self.key)
            self.order = np.asarray(jax.random.permutation(sub, self.n))
            self.pos = 0
        idx = self.order[self.pos : self.pos + self.size]
        self.pos += self.size
        return idx

    def state(self) -> dict[str, Any]:
        return {"key": np.asarray(self.key), "order": np.asarray(self.order), "pos": self.pos}

    def restore(self, state: dict[str, Any]) -> None:
        key, order, pos = np.asarray(state["key"]), np.asarray(state["order"]), int(state["pos"])
        if key.shape != np.shape(self.key) or order.shape != (self.n,) or not 0 <= pos <= self.n:
            raise ValueError("batch sampler state of another shape")
        self.key, self.order, self.pos = jnp.asarray(key), order, pos


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


# --- the state file -------------------------------------------------------------------------


def _leaves(tree) -> dict[str, np.ndarray]:
    return {str(i): np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _restore_tree(template, saved: dict[str, Any]):
    """``template``'s tree with the saved leaves, each checked for its shape and dtype."""
    leaves, treedef = jax.tree.flatten(template)
    if not isinstance(saved, dict) or len(saved) != len(leaves):
        raise ValueError("saved tree of another structure")
    out = []
    for i, leaf in enumerate(leaves):
        value = saved[str(i)]
        if not isinstance(value, np.ndarray):
            raise ValueError(f"saved leaf {i} is not an array")
        if value.shape != np.shape(leaf) or value.dtype != np.dtype(leaf.dtype):
            raise ValueError(
                f"saved leaf {i} is {value.dtype}{list(value.shape)}, expected "
                f"{np.dtype(leaf.dtype)}{list(np.shape(leaf))}"
            )
        out.append(jnp.asarray(value))
    return jax.tree.unflatten(treedef, out)


def _encode(state: dict[str, Any]) -> bytes:
    payload = serialization.msgpack_serialize(state)
    return _MAGIC + hashlib.sha256(payload).digest() + payload


def _decode(data: bytes) -> dict[str, Any]:
    if not data.startswith(_MAGIC):
        raise ValueError("not an adam_loop state file")
    digest = data[len(_MAGIC) : len(_MAGIC) + _DIGEST]
    payload = data[len(_MAGIC) + _DIGEST :]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch (torn or corrupt file)")
    state = serialization.msgpack_restore(payload)
    if not isinstance(state, dict):
        raise ValueError("payload is not a mapping")
    return state


def _read_state(path: str, fingerprint: str, settings: dict[str, Any], steps: int):
    """The saved state at ``path`` if it can resume this fit, else None (with a warning)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            state = _decode(f.read())
        saved_fp, saved_settings = state["fingerprint"], state["settings"]
        step = int(state["step"])
    except Exception as e:  # whatever is wrong with the file: start over
        logger.warning("ignoring the unreadable training state %s (%s: %s); starting over",
                       path, type(e).__name__, e)  # fmt: skip
        return None
    if saved_fp != fingerprint:
        logger.warning("ignoring the training state %s: written for %r, not %r; starting over",
                       path, saved_fp, fingerprint)  # fmt: skip
        return None
    if saved_settings != settings:
        logger.warning("ignoring the training state %s: written with settings %s, not %s; "
                       "starting over", path, saved_settings, settings)  # fmt: skip
        return None
    if step > steps:
        logger.warning("ignoring the training state %s: it has %d updates, more than the %d "
                       "asked for; starting over", path, step, steps)  # fmt: skip
        return None
    return state


class _Loop:
    """The mutable loop state (one object, so that it is saved and restored as a whole)."""

    def __init__(self, params, opt_state, init_val: float, batches: _Batches):
        self.params, self.opt_state = params, opt_state
        self.best_params, self.best_val, self.best_step = params, init_val, 0
        self.init_val = init_val
        self.batches = batches
        self.train_curve: list[float] = []
        self.val_curve: list[float] = []
        self.skipped = self.bad_evals = self.step = 0
        self.stopped = False
        self.seconds = 0.0

    def to_dict(self, fingerprint: str, settings: dict[str, Any], extra, seconds: float):
        return {
            "fingerprint": fingerprint,
            "settings": settings,
            "step": self.step,
            "stopped": self.stopped,
            "paths": _paths((self.params, self.opt_state)),
            "params": _leaves(self.params),
            "opt_state": _leaves(self.opt_state),
            "best_params": _leaves(self.best_params),
            "best_val": self.best_val,
            "best_step": self.best_step,
            "init_val": self.init_val,
            "bad_evals": self.bad_evals,
            "skipped": self.skipped,
            "train_loss": np.asarray(self.train_curve, np.float64),
            "val_loss": np.asarray(self.val_curve, np.float64),
            "seconds": seconds,
            "batches": self.batches.state(),
            "extra": extra,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load ``state`` (checked against this loop's trees; raises on any mismatch)."""
        if state["paths"] != _paths((self.params, self.opt_state)):
            raise ValueError("saved parameters or optimizer state of another structure")
        params = _restore_tree(self.params, state["params"])
        opt_state = _restore_tree(self.opt_state, state["opt_state"])
        best_params = _restore_tree(self.params, state["best_params"])
        train = [float(v) for v in np.asarray(state["train_loss"], np.float64)]
        val = [float(v) for v in np.asarray(state["val_loss"], np.float64)]
        step = int(state["step"])
        if len(train) != step:
            raise ValueError(f"{len(train)} training losses for {step} updates")
        self.batches.restore(state["batches"])
        self.params, self.opt_state, self.best_params = params, opt_state, best_params
        self.best_val, self.best_step = float(state["best_val"]), int(state["best_step"])
        self.init_val = float(state["init_val"])
        self.bad_evals, self.skipped = int(state["bad_evals"]), int(state["skipped"])
        self.train_curve, self.val_curve = train, val
        self.step, self.stopped = step, bool(state["stopped"])
        self.seconds = float(state["seconds"])


# --- the loop -------------------------------------------------------------------------------


def fit_adam(
    loss_and_grads: LossAndGrads,
    val_loss: Callable[[Any], float],
    params,
    num_train: int,
    *,
    steps: int,
    learning_rate: float,
    final_lr_fraction: float = 1.0,
    batch_size: int | None = None,
    patience: int = 30,
    clip_norm: float = 1.0,
    eval_every: int = 1,
    seed: int = 0,
    callback: Callable[[int, float, float | None], None] | None = None,
    after_update: Callable[[int, np.ndarray, Any, Any], None] | None = None,
    state_path: str | None = None,
    state_fingerprint: str = "",
    checkpoint_every: int = 25,
    extra_state: ExtraState | None = None,
    progress: Callable[[int], Any] | None = None,
    name: str = "adam",
) -> LoopResult:
    """Minimise a training loss with Adam, early-stopped on a validation loss (module docstring).

    ``loss_and_grads(params, idx) -> (loss, aux, grads)``: the mean training loss over the
    training rows ``idx`` (an integer numpy array from the batch sampler, ``arange(num_train)``
    for full batches; the caller closes over its data), any ``aux`` for ``after_update``, and
    ``d loss / d params`` (a tree like ``params``). ``val_loss(params) -> float``. ``params``:
    the initial tree (leaves become JAX arrays). ``steps`` updates of Adam after global-norm
    clipping to ``clip_norm``, the rate decaying from ``learning_rate`` to
    ``final_lr_fraction * learning_rate`` along a cosine over ``steps``; ``batch_size`` rows
    per update (None: all); ``patience`` evaluations (every ``eval_every`` updates) without
    improvement stop the fit.
    ``callback(k, train_loss, val)`` after update ``k`` (``val`` None when not evaluated);
    ``after_update(k, idx, aux, new_params)`` right after each successful (not skipped) update.

    ``state_path``: resume from / checkpoint to this file every ``checkpoint_every`` updates and
    at the end; resumed only when ``state_fingerprint`` and the loop settings match (module
    docstring). ``extra_state``: the caller's own state to save and restore with the loop's (it
    must change only in ``after_update``/``callback``, as the file is written after them).
    ``progress(n)``: advanced by 1 after every update (and once by the restored number of
    updates on resume). ``name`` prefixes the log lines.

    Raises ValueError for bad settings and when the initial validation loss is not finite.
    """
    if steps < 0 or patience < 1 or eval_every < 1 or checkpoint_every < 1 or num_train < 1:
        raise ValueError(
            f"need steps >= 0, patience >= 1, eval_every >= 1, checkpoint_every >= 1, "
            f"num_train >= 1; got {steps}, {patience}, {eval_every}, {checkpoint_every}, "
            f"{num_train}"
        )
    if not 0.0 < final_lr_fraction <= 1.0:
        raise ValueError(f"final_lr_fraction must be in (0, 1], got {final_lr_fraction!r}")
    start = time.perf_counter()
    params = jax.tree.map(jnp.asarray, params)
    rate = learning_rate
    if final_lr_fraction < 1.0:
        rate = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=final_lr_fraction)
    optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(rate))
    batches = _Batches(num_train, batch_size, seed)
    settings = {
        "num_train": int(num_train),
        "batch_size": batches.size,
        "learning_rate": float(learning_rate),
        "final_lr_fraction": float(final_lr_fraction),
        "steps_for_decay": int(steps) if final_lr_fraction < 1.0 else None,
        "clip_norm": float(clip_norm),
        "patience": int(patience),
        "eval_every": int(eval_every),
        "seed": int(seed),
        "extra_state": extra_state is not None,
    }
    loop = _Loop(params, optimizer.init(params), math.nan, batches)
    saved = None
    if state_path is not None:
        saved = _read_state(state_path, state_fingerprint, settings, steps)
    if saved is not None:
        try:
            loop.restore(saved)
            if extra_state is not None:
                extra_state.set(saved["extra"])
        except Exception as e:  # a state that does not fit this fit: start over
            logger.warning("ignoring the training state %s (%s: %s); starting over",
                           state_path, type(e).__name__, e)  # fmt: skip
            batches = _Batches(num_train, batch_size, seed)
            loop = _Loop(params, optimizer.init(params), math.nan, batches)
            saved = None
    resumed = loop.step
    if saved is None:
        init_val = float(val_loss(params))
        if not np.isfinite(init_val):
            raise ValueError(f"the initial validation loss is not finite ({init_val})")
        loop.best_val = loop.init_val = init_val
    else:
        logger.info("%s: resumed from %s at update %d/%d (best validation loss %.6g at %d)",
                    name, state_path, resumed, steps, loop.best_val, loop.best_step)  # fmt: skip
        if progress is not None and resumed:
            progress(resumed)
    prior_seconds = loop.seconds

    def checkpoint() -> None:
        if state_path is None:
            return
        extra = extra_state.get() if extra_state is not None else None
        seconds = prior_seconds + time.perf_counter() - start
        state = loop.to_dict(state_fingerprint, settings, extra, seconds)
        atomic_write_bytes(state_path, _encode(state))

    log_every = max(1, steps // 10)
    rate = Rate(steps, resumed)
    while loop.step < steps and not loop.stopped:
        step = loop.step
        idx = loop.batches.next()
        loss, aux, grads = loss_and_grads(loop.params, idx)
        loss = float(loss)
        if not (np.isfinite(loss) and _finite(grads)):
            loop.skipped += 1
            logger.warning("%s step %d: non-finite loss or gradient (%s), update skipped",
                           name, step, loss)  # fmt: skip
            loop.train_curve.append(float("nan"))
        else:
            loop.train_curve.append(loss)
            updates, loop.opt_state = optimizer.update(grads, loop.opt_state, loop.params)
            loop.params = optax.apply_updates(loop.params, updates)
            if after_update is not None:
                after_update(step, idx, aux, loop.params)
        val = None
        if (step + 1) % eval_every == 0:
            val = float(val_loss(loop.params))
            loop.val_curve.append(val)
            if np.isfinite(val) and val < loop.best_val:
                loop.best_params, loop.best_val, loop.best_step = loop.params, val, step + 1
                loop.bad_evals = 0
            else:
                loop.bad_evals += 1
        if callback is not None:
            callback(step, loop.train_curve[-1], val)
        loop.step = step + 1
        loop.stopped = loop.bad_evals >= patience
        if progress is not None:
            progress(1)
        if loop.step % log_every == 0 or loop.step == steps or loop.stopped:
            last_val = loop.val_curve[-1] if loop.val_curve else loop.init_val
            eta = format_duration(0.0) if loop.stopped else rate.eta(loop.step)
            logger.info("%s step %d/%d: train %.6g, val %.6g (best %.6g at %d), %.3g steps/s, "
                        "ETA %s", name, loop.step, steps, loop.train_curve[-1], last_val,
                        loop.best_val, loop.best_step, rate.per_second(loop.step), eta)  # fmt: skip
        if loop.step % checkpoint_every == 0 and loop.step < steps and not loop.stopped:
            checkpoint()
    checkpoint()
    return LoopResult(
        params=loop.best_params,
        train_loss=loop.train_curve,
        val_loss=loop.val_curve,
        best_step=loop.best_step,
        init_val_loss=loop.init_val,
        best_val_loss=loop.best_val,
        seconds=prior_seconds + time.perf_counter() - start,
        skipped_steps=loop.skipped,
        resumed_step=resumed,
    )
