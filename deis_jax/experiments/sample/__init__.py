"""``--mode=sample``: draw samples from a trained or converted model with ``config.sampler``.

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=sample

Parameters come from ``config.sampling.checkpoint`` when set -- a converted score_sde
checkpoint directory (``scripts/convert_score_sde_checkpoint.py``) or a raw score_sde
``checkpoint_<N>`` file -- and otherwise from the EMA parameters of the latest training
checkpoint under ``<workdir>/checkpoints`` (``deis_jax.models.loading``). Writes, under
``<workdir>/samples/<method><order>_nfe<nfe>_<grid>/``: ``shards/`` (resumable, atomically
written and hashed shards and a verified ``manifest.json``, see
``deis_jax.experiments.generation``), then, from the verified manifest only, ``samples.npz``
(``samples``: uint8 NHWC images, plus the sampler's time grid and NFE) and ``samples.png`` (a
grid of up to 100), both written atomically.

A rerun resumes. Its identity (:func:`sample_identity`) is every setting that changes a
sample -- the seed, ``config.sde`` / ``sampler`` / ``model``, the data fields the images
depend on, the checkpoint (its step or path and the sha256 of the parameters themselves) and
the sha256 of an AMED ``predictor_file``: if training has since written a newer checkpoint, or
any of these changed, the rerun is refused with one line per differing setting, so a run never
mixes samples of two models. ``sampling.num_samples`` (more samples extend the run) and
``sampling.batch_size`` are not part of it.

Sample ``i`` starts from ``x_T ~ N(0, prior_std^2)`` drawn with ``fold_in(prior_key, i)`` and
its noise (stochastic samplers) from ``fold_in(noise_key, i)``, so the images do not depend on
the batch size or the number of devices or hosts. A class-conditional model (EDM's ImageNet-64
network) samples class ``labels(i)`` (``config.sampling.labels``: ``random`` from the seed,
``fixed`` = ``config.sampling.class_label``, ``cycle`` = ``i mod classes``;
``deis_jax.sampling.class_labels``), stored as ``labels`` in ``samples.npz``, with
classifier-free guidance ``config.sampling.guidance_scale``.
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import jax
import numpy as np
from absl import logging

from deis_jax.common import data, image_grid, parallel
from deis_jax.common.checks import ConfigError, require_number
from deis_jax.common.files import NPZ_ERRORS, atomic_output, atomic_write_bytes, sha256_file
from deis_jax.common.identity import fingerprint
from deis_jax.common.precision import model_identity
from deis_jax.experiments import generation
from deis_jax.experiments.validation import validate_sampler, validate_sde
from deis_jax.fitting.recipes import FittedSampler
from deis_jax.models.loading import (
    LoadedModel,
    class_labels_of,
    image_shape,
    load_model,
    validate_model_and_data,
    verify_sampling_params,
)
from deis_jax.sampling import solvers
from deis_jax.sampling.sampler import Sampler
from deis_jax.sampling.sde import NoiseSchedule

MAX_GRID = 100
NPZ_FILE, PNG_FILE = "samples.npz", "samples.png"
SAMPLE_SECTIONS = ("seed", "sde", "sampler", "model", "data", "sampling")
NOT_SAMPLE_FIELDS = {  # fields of SAMPLE_SECTIONS that do not change a sample
    "data": ("data_dir", "random_flip", "uniform_dequantization"),  # training only
    "sampling": ("num_samples", "batch_size"),  # more samples extend a run; batch: rounding
}


class Plan(NamedTuple):
    """What :func:`validate` built: the schedule and the sampler (network not yet bound)."""

    schedule: NoiseSchedule
    sampler: Sampler


def validate(config) -> Plan:
    """Check the SDE, sampler, model, data and ``config.sampling`` fields."""
    schedule = validate_sde(config)
    sampler = validate_sampler(config, schedule)
    validate_model_and_data(config)
    require_number(config, "sampling.num_samples", integer=True, minimum=1)
    require_number(config, "sampling.batch_size", integer=True, minimum=1)
    require_number(config, "sampling.shard_size", integer=True, minimum=1)
    ckpt = config.sampling.get("checkpoint")
    if ckpt is not None and not isinstance(ckpt, str):
        raise ConfigError(f"config.sampling.checkpoint must be a path or None, got {ckpt!r}")
    return Plan(schedule, sampler)


def sample_identity(config, model: LoadedModel) -> dict:
    """What the samples of ``--mode=sample`` depend on, the generation ``metadata`` (its
    fingerprint identifies the run): the config sections :data:`SAMPLE_SECTIONS` without
    :data:`NOT_SAMPLE_FIELDS`, the model's identity (``params_sha256`` and the checkpoint
    step or path, :attr:`LoadedModel.identity`) and the sha256 of
    ``config.sampler.predictor_file`` (None without one)."""
    values = config.to_dict()
    settings = {key: values.get(key) for key in SAMPLE_SECTIONS}
    for section, fields in NOT_SAMPLE_FIELDS.items():
        settings[section] = {k: v for k, v in settings[section].items() if k not in fields}
    predictor = config.sampler.get("predictor_file")
    return {
        "config": settings,
        "model": model.identity,
        "predictor_sha256": sha256_file(predictor) if predictor else None,
    }


def _warn_if_replacing(npz_path: str, arrays: dict[str, np.ndarray]) -> None:
    """Log a warning naming ``npz_path`` when it exists but is unreadable or holds other
    arrays than ``arrays`` (what the verified shards give; it is about to be rewritten).
    Reading every member also checks its zip CRC."""
    if not os.path.exists(npz_path):
        return
    try:
        with np.load(npz_path) as f:
            same = set(f.files) == set(arrays) and all(
                np.array_equal(f[k], v) for k, v in arrays.items()
            )
        why = None if same else "other arrays than the verified shards: damaged, or an older run"
    except NPZ_ERRORS as err:
        why = f"unreadable: {type(err).__name__}: {err}"
    if why is not None:
        logging.warning("%s is damaged (%s): rewritten from the verified shards", npz_path, why)


def _write_outputs(
    out_dir: str, images: np.ndarray, sampler: Sampler, scale: int, labels: np.ndarray | None
) -> None:
    """``samples.npz`` (with the samples' classes ``labels`` for a class-conditional model)
    and ``samples.png`` of verified ``images``, each written atomically."""
    npz_path, png_path = os.path.join(out_dir, NPZ_FILE), os.path.join(out_dir, PNG_FILE)
    arrays = {"samples": images, "ts": np.asarray(sampler.ts), "nfe": np.asarray(sampler.nfe)}
    if labels is not None:
        arrays["labels"] = labels
    _warn_if_replacing(npz_path, arrays)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(npz_path, buf.getvalue())
    with atomic_output(png_path) as tmp:
        image_grid.save_image_grid(images[:MAX_GRID], tmp, scale=scale)
    logging.info("wrote %s and %s", npz_path, png_path)


def check_fitted_model(config, schedule: NoiseSchedule, model: LoadedModel) -> None:
    """A ``config.sampler.fitted_file`` must have been fitted to this network (its
    ``model_id``: the fingerprint of the model's identity, as ``--mode=fit`` records it);
    ``ConfigError`` naming the field and both ids otherwise."""
    path = config.sampler.get("fitted_file")
    if not path:
        return
    try:
        FittedSampler.load(path, schedule, model_id=fingerprint(model.identity))
    except ValueError as err:
        raise ConfigError(f"config.sampler.fitted_file is invalid: {err}") from None


def check_inputs(config, workdir: str, plan: Plan) -> None:
    """The checkpoint is there and holds this network (``verify_sampling_params``: its
    structure against ``jax.eval_shape`` of the network, before any network is built)."""
    if config.data.name != "gmm":
        verify_sampling_params(config, workdir)


def run(
    config, workdir: str, plan: Plan | None = None, *, model: LoadedModel | None = None
) -> dict:
    """Generate ``config.sampling.num_samples`` images; returns paths and the sampler info.

    Generation is sharded over every device (and process) and resumable: shards are written
    atomically under ``<out_dir>/shards`` with a verified ``manifest.json``
    (``deis_jax.experiments.generation``), so a killed run continues where it stopped; a
    rerun with another :func:`sample_identity` (e.g. a newer checkpoint) raises
    ``generation.DifferentRunError`` naming what differs. ``model`` replaces the network and
    parameters of the config.
    """
    plan = validate(config) if plan is None else plan
    schedule, sampler = plan.schedule, plan.sampler
    model = load_model(config, workdir, schedule) if model is None else model
    check_fitted_model(config, schedule, model)
    mesh = parallel.make_mesh()
    shape = image_shape(config)
    grid = config.sampler.grid or solvers.get_method(sampler.method).default_grid
    tag = f"{sampler.method}{sampler.order}_nfe{sampler.nfe}_{grid}"
    dtype = model_identity(config.model.to_dict()).get("dtype")
    tag += f"_{dtype}" if dtype else ""  # a low-precision network's samples apart
    out_dir = os.path.join(workdir, "samples", tag)
    shard_dir = os.path.join(out_dir, "shards")
    logging.info(
        "sampling %d images with %s order %d, NFE %d (%d steps) on %d device(s)",
        config.sampling.num_samples, sampler.method, sampler.order, sampler.nfe,
        sampler.num_steps, mesh.size,
    )  # fmt: skip
    labels = class_labels_of(config, model, config.seed)
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
        labels=labels,
        postprocess=lambda x: image_grid.to_uint8(data.postprocess(x, config.data.centered)),
        metadata=sample_identity(config, model),
    )
    images = None
    if jax.process_index() == 0:
        images = generation.load_samples(shard_dir).samples
        classes = None if labels is None else np.asarray(labels(np.arange(len(images))))
        scale = max(1, 64 // config.data.image_size)
        _write_outputs(out_dir, images, sampler, scale, classes)
    return {
        "npz": os.path.join(out_dir, NPZ_FILE),
        "png": os.path.join(out_dir, PNG_FILE),
        "shards": shard_dir,
        "nfe": sampler.nfe,
        "shape": None if images is None else images.shape,
    }
