"""``--mode=sample``: draw samples from a trained or converted model with ``config.sampler``.

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=sample

Parameters come from ``config.sampling.checkpoint`` when set -- a converted score_sde
checkpoint directory (``scripts/convert_score_sde_checkpoint.py``) or a raw score_sde
``checkpoint_<N>`` file -- and otherwise from the EMA parameters of the latest training
checkpoint under ``<workdir>/checkpoints`` (``deis_jax.models.loading``). Writes, under
``<workdir>/samples/<method><order>_nfe<nfe>_<grid>/``: ``shards/`` (resumable, atomically
written shards and a verified ``manifest.json``, see ``deis_jax.experiments.generation``),
``samples.npz`` (``samples``: uint8 NHWC images, plus the sampler's time grid and NFE) and
``samples.png`` (a grid of up to 100).

Sample ``i`` starts from ``x_T ~ N(0, prior_std^2)`` drawn with ``fold_in(prior_key, i)`` and
its noise (stochastic samplers) from ``fold_in(noise_key, i)``, so the images do not depend on
the batch size or the number of devices or hosts.
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import jax
import numpy as np
from absl import logging

from deis_jax import data, image_grid, parallel
from deis_jax.config_validation import ConfigError, require_number, validate_sampler, validate_sde
from deis_jax.experiments import generation
from deis_jax.io_utils import atomic_write_bytes
from deis_jax.models.loading import LoadedModel, image_shape, load_model, validate_model_and_data
from deis_jax.sampling import solvers
from deis_jax.sampling.sampler import Sampler
from deis_jax.sampling.sde import NoiseSchedule

MAX_GRID = 100


class Plan(NamedTuple):
    """What :func:`validate` built: the schedule and the sampler (network not yet bound)."""

    schedule: NoiseSchedule
    sampler: Sampler


def validate(config) -> Plan:
    """Check the SDE, sampler, model, data and ``config.sampling`` fields."""
    schedule = validate_sde(config)
    sampler = validate_sampler(config, schedule)
    validate_model_and_data(config)
    require_number(config, "seed", integer=True, minimum=0)
    require_number(config, "sampling.num_samples", integer=True, minimum=1)
    require_number(config, "sampling.batch_size", integer=True, minimum=1)
    require_number(config, "sampling.shard_size", integer=True, minimum=1)
    ckpt = config.sampling.get("checkpoint")
    if ckpt is not None and not isinstance(ckpt, str):
        raise ConfigError(f"config.sampling.checkpoint must be a path or None, got {ckpt!r}")
    return Plan(schedule, sampler)


def run(
    config, workdir: str, plan: Plan | None = None, *, model: LoadedModel | None = None
) -> dict:
    """Generate ``config.sampling.num_samples`` images; returns paths and the sampler info.

    Generation is sharded over every device (and process) and resumable: shards are written
    atomically under ``<out_dir>/shards`` with a verified ``manifest.json``
    (``deis_jax.experiments.generation``), so a killed run continues where it stopped.
    ``model`` replaces the network and parameters of the config.
    """
    plan = validate(config) if plan is None else plan
    schedule, sampler = plan.schedule, plan.sampler
    model = load_model(config, workdir, schedule) if model is None else model
    mesh = parallel.make_mesh()
    shape = image_shape(config)
    grid = config.sampler.grid or solvers.get_method(sampler.method).default_grid
    tag = f"{sampler.method}{sampler.order}_nfe{sampler.nfe}_{grid}"
    out_dir = os.path.join(workdir, "samples", tag)
    shard_dir = os.path.join(out_dir, "shards")
    logging.info(
        "sampling %d images with %s order %d, NFE %d (%d steps) on %d device(s)",
        config.sampling.num_samples, sampler.method, sampler.order, sampler.nfe,
        sampler.num_steps, mesh.size,
    )  # fmt: skip
    generation.generate_samples(
        shard_dir,
        sampler,
        num_samples=config.sampling.num_samples,
        sample_shape=shape,
        seed=config.seed,
        shard_size=config.sampling.shard_size,
        per_device_batch=max(1, config.sampling.batch_size // mesh.size),
        mesh=mesh,
        prior=lambda key: schedule.prior_sample(key, shape),
        params=model.params,
        bind=model.bind,
        postprocess=lambda x: image_grid.to_uint8(data.postprocess(x, config.data.centered)),
        metadata={"config": config.to_dict(), "checkpoint": config.sampling.get("checkpoint")},
    )
    npz_path = os.path.join(out_dir, "samples.npz")
    png_path = os.path.join(out_dir, "samples.png")
    images = None
    if jax.process_index() == 0:
        images = generation.load_samples(shard_dir).samples
        buf = io.BytesIO()
        np.savez_compressed(buf, samples=images, ts=sampler.ts, nfe=sampler.nfe)
        atomic_write_bytes(npz_path, buf.getvalue())
        scale = max(1, 64 // config.data.image_size)
        image_grid.save_image_grid(images[:MAX_GRID], png_path, scale=scale)
        logging.info("wrote %s and %s", npz_path, png_path)
    return {
        "npz": npz_path,
        "png": png_path,
        "shards": shard_dir,
        "nfe": sampler.nfe,
        "shape": None if images is None else images.shape,
    }
