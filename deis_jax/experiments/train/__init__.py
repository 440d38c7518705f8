"""``--mode=train``: train a score network; checkpoints go to ``<workdir>/checkpoints``.

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=train

Re-running the same command resumes from the newest intact checkpoint and continues exactly as
an uninterrupted run would (data order and randomness are functions of ``(seed, step)``).
Logs (loss, grad norm, steps/s, ETA) go to absl logging and ``<workdir>/metrics.jsonl``.

Integrity (``deis_jax.training.loop``): each checkpoint records the sha256 of its files and the
run's :func:`identity`; a damaged newest checkpoint is moved aside with a warning and training
resumes from the newest intact one; a checkpoint of another run (other model, data, SDE, seed
or training settings) is refused with the differing fields named. On resume the records of
``metrics.jsonl`` logged after the restored step are dropped (the resumed run logs those steps
again), so the log holds one record per logged step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import flax.linen as nn
import jax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deis_jax.common import checkpoint_store, data, parallel
from deis_jax.common.checks import ConfigError, require_choice, require_number
from deis_jax.common.files import atomic_write_text
from deis_jax.common.precision import model_identity
from deis_jax.experiments.validation import validate_sde
from deis_jax.models import family_of
from deis_jax.models.loading import (
    build_model,
    image_shape,
    model_prediction,
    validate_model_and_data,
)
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.training import loop as training

BOOL = (True, False)
RESUMABLE = ("n_iters", "log_every", "checkpoint_every")  # may change between resumes


def identity(config) -> dict:
    """What a checkpoint of this run depends on: seed, data (but its location), model, SDE and
    the training settings but :data:`RESUMABLE` ones; recorded with every checkpoint."""
    data = config.data.to_dict()
    data.pop("data_dir", None)
    tcfg = {k: v for k, v in config.training.to_dict().items() if k not in RESUMABLE}
    return {"seed": config.seed, "data": data, "model": model_identity(config.model.to_dict()),
            "sde": config.sde.to_dict(), "training": tcfg}  # fmt: skip


def validate(config) -> NoiseSchedule:
    """Check the SDE, model, data and ``config.training`` fields; returns the schedule."""
    schedule = validate_sde(config)
    validate_model_and_data(config)
    if not family_of(config).trainable or config.sde.name == "edm":
        raise ConfigError(
            "config.model.name='edm' / config.sde.name='edm': EDM's networks are converted "
            "from the published pickles (scripts/convert_edm_checkpoint.py) and sampled, not "
            "trained here (their preconditioning and log-normal noise distribution are not "
            "implemented in the training loss); use --mode=sample, table or fit"
        )
    if config.model.get("dtype") == "float16":
        raise ConfigError(
            "config.model.dtype='float16' is not trainable here (float16 gradients need loss "
            "scaling, which the training loop does not do): use 'bfloat16' or 'float32'"
        )
    t = "training"
    require_number(config, f"{t}.batch_size", integer=True, minimum=1)
    require_number(config, f"{t}.n_iters", integer=True, minimum=1)
    require_number(config, f"{t}.log_every", integer=True, minimum=1)
    require_number(config, f"{t}.checkpoint_every", integer=True, minimum=1)
    require_number(config, f"{t}.lr", minimum=0, exclusive_minimum=True)
    require_number(config, f"{t}.warmup", integer=True, minimum=0)
    require_number(config, f"{t}.grad_clip", minimum=-1)
    require_number(config, f"{t}.ema_rate", minimum=0, maximum=1)
    require_number(config, f"{t}.eps", minimum=0, maximum=0.5, exclusive_minimum=True)
    require_choice(config, f"{t}.likelihood_weighting", BOOL)
    require_choice(config, f"{t}.reduce_mean", BOOL)
    if config.training.get("ema_warmup") is not None:
        require_choice(config, f"{t}.ema_warmup", BOOL)
    return schedule


def check_inputs(config, workdir: str, plan: NoiseSchedule) -> None:
    """The training split of the tfds data is there (``DatasetNotFoundError`` saying how to
    prepare it)."""
    data.get_source(config.data, "train")


def run(
    config,
    workdir: str,
    plan: NoiseSchedule | None = None,
    *,
    model: nn.Module | None = None,
    source=None,
    callback: Callable[[int, dict], None] | None = None,
) -> tuple[training.TrainState, list[dict]]:
    """Train (or resume) per ``config``; returns ``(final TrainState, logged records)``.

    ``plan`` is :func:`validate`'s schedule. ``model`` (a Flax module) and ``source`` (a
    random-access data source) replace the ones the config describes -- tests use them for
    tiny networks and mocked data; ``callback(step, metrics)`` runs after every step.
    """
    schedule = validate(config) if plan is None else plan
    tcfg = config.training
    model = build_model(config) if model is None else model
    tx = training.optimizer_from_config(tcfg)
    mesh = parallel.make_mesh()
    if tcfg.batch_size % mesh.size:
        raise ConfigError(
            f"config.training.batch_size={tcfg.batch_size} must be divisible by the number "
            f"of devices ({mesh.size})"
        )
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        text = config.to_json_best_effort(indent=1)
        atomic_write_text(os.path.join(workdir, "config.json"), text)

    shape = image_shape(config)
    init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x1A1)
    state = jax.jit(
        lambda k: training.init_state(model, tx, k, shape),
        out_shardings=NamedSharding(mesh, P()),
    )(init_key)
    mngr = checkpoint_store.checkpoint_manager(os.path.join(workdir, "checkpoints"))
    run_identity = identity(config)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    try:
        restored = checkpoint_store.restore_state(mngr, state, identity=run_identity)
        if restored is not None:
            state = restored
            logging.info("resumed from %s at step %d", mngr.directory, int(state.step))
        if jax.process_index() == 0 and training.trim_metrics(metrics_path, int(state.step)):
            logging.info("%s: dropped the records after step %d (logged again now)",
                         metrics_path, int(state.step))  # fmt: skip
        num_params = sum(x.size for x in jax.tree.leaves(state.params))
        logging.info(
            "training %s (%d params) on %s, %d device(s), global batch %d, %d steps",
            config.model.get("name", type(model).__name__), num_params, config.data.name,
            mesh.size, tcfg.batch_size, tcfg.n_iters,
        )  # fmt: skip

        ds = data.get_dataset(
            config.data,
            batch_size=tcfg.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            source=source,
        )
        batches = (training.global_batch(b, mesh) for b in data.iterate(ds, int(state.step)))
        step_fn = training.make_train_step(
            model,
            schedule,
            tx,
            prediction=model_prediction(config),
            seed=config.seed,
            ema_rate=tcfg.ema_rate,
            ema_warmup=tcfg.get("ema_warmup", False),
            eps=tcfg.eps,
            reduce_mean=tcfg.reduce_mean,
            likelihood_weighting=tcfg.likelihood_weighting,
        )
        state, history = training.train_loop(
            state,
            training.shard_step(step_fn, mesh),
            batches,
            num_steps=tcfg.n_iters,
            log_every=tcfg.log_every,
            checkpoint_every=tcfg.checkpoint_every,
            mngr=mngr,
            metrics_path=metrics_path,
            callback=callback,
            identity=run_identity,
        )
    finally:
        mngr.close()
    if history:
        logging.info("final record: %s", json.dumps(history[-1]))
    return state, history
