"""``--mode=sample``: draw samples from a trained or converted model with ``config.sampler``.

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=sample

Parameters come from ``config.sampling.checkpoint`` when set -- a converted score_sde
checkpoint directory (``scripts/convert_score_sde_checkpoint.py``) or a raw score_sde
``checkpoint_<N>`` file -- and otherwise from the EMA parameters of the latest training
checkpoint under ``<workdir>/checkpoints``. Writes, under
``<workdir>/samples/<method><order>_nfe<nfe>_<grid>/``: ``samples.npz`` (``samples``: uint8
NHWC images, plus the sampler's time grid and NFE) and ``samples.png`` (a grid of up to 100).

Sample ``i`` starts from ``x_T ~ N(0, prior_std^2)`` drawn with ``fold_in(key, i)``, so the
images do not depend on the batch size or the number of devices.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deis_jax import build, data, image_grid
from deis_jax import train as training
from deis_jax.config_validation import ConfigError, require_number, validate_sampler, validate_sde
from deis_jax.modes.train import validate_model_and_data
from deis_jax.wrappers import eps_fn_from_model

MAX_GRID = 100


def validate(config) -> None:
    schedule = validate_sde(config)
    validate_sampler(config, schedule)
    validate_model_and_data(config)
    require_number(config, "seed", integer=True, minimum=0)
    require_number(config, "sampling.num_samples", integer=True, minimum=1)
    require_number(config, "sampling.batch_size", integer=True, minimum=1)
    ckpt = config.sampling.get("checkpoint")
    if ckpt is not None and not isinstance(ckpt, str):
        raise ConfigError(f"config.sampling.checkpoint must be a path or None, got {ckpt!r}")


def _missing_training_checkpoint(config, directory: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no training checkpoint found in '{directory}'. Either train one first:\n"
        f"    python main.py --config=<this config> --workdir={os.path.dirname(directory)} "
        f"--mode=train\n"
        f"or set config.sampling.checkpoint to a converted score_sde checkpoint, e.g. "
        f"--config.sampling.checkpoint=checkpoints/converted/vp_cifar10_ddpmpp_deep_continuous_8 "
        f"(download checkpoint_8 of vp/cifar10_ddpmpp_deep_continuous from the 'Pretrained "
        f"checkpoints' of https://github.com/yang-song/score_sde into checkpoints/ and convert "
        f"it with scripts/convert_score_sde_checkpoint.py)."
    )


def load_sampling_params(config, workdir: str, model):
    """The parameters to sample with (see the module docstring for where they come from)."""
    from deis_jax import checkpoints

    path = config.sampling.get("checkpoint")
    if path:
        if os.path.isfile(path):  # a raw score_sde checkpoint_<N> msgpack file
            logging.info("loading score_sde checkpoint %s (params_ema)", path)
            return checkpoints.load_score_sde_params(path, training.model_config(config))
        logging.info("loading converted parameters from %s", path)
        return checkpoints.load_params(path, training.model_config(config))

    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise _missing_training_checkpoint(config, directory)
    tx = training.optimizer_from_config(config.training)
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    target = jax.eval_shape(lambda: training.init_state(model, tx, jax.random.PRNGKey(0), shape))
    mngr = training.checkpoint_manager(directory)
    try:
        state = training.restore_state(mngr, target)
        if state is None:
            raise _missing_training_checkpoint(config, directory)
        logging.info("restored EMA parameters from %s at step %d", directory, int(state.step))
        return state.ema_params
    finally:
        mngr.close()


def sample(config, workdir: str, *, model=None) -> dict:
    """Generate ``config.sampling.num_samples`` images; returns paths and the sampler info."""
    schedule = build.schedule_from_config(config.sde)
    model = training.build_model(config) if model is None else model
    params = load_sampling_params(config, workdir, model)

    mesh = training.make_mesh()
    params = jax.device_put(params, NamedSharding(mesh, P()))
    prediction = training.model_prediction(config)
    # Coefficients are built here once, on the host; the network is bound inside the jit so
    # the parameters are arguments, not compile-time constants.
    sampler = build.sampler_from_config(config.sampler, schedule, lambda x, t: x)
    n, batch = config.sampling.num_samples, config.sampling.batch_size
    batch = math.ceil(batch / mesh.size) * mesh.size  # divisible by the device count
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    noise_key, sampler_key = jax.random.split(jax.random.PRNGKey(config.seed))

    def prior(key):
        return schedule.prior_sample(key, shape)

    def generate(params, offset):
        eps_fn = eps_fn_from_model(
            lambda x, labels: model.apply({"params": params}, x, labels, train=False),
            schedule,
            prediction,
        )
        bound = dataclasses.replace(sampler, eps_fn=eps_fn)
        index = offset + jnp.arange(batch)
        x_T = jax.vmap(lambda i: prior(jax.random.fold_in(noise_key, i)))(index)
        x_T = jax.lax.with_sharding_constraint(x_T, NamedSharding(mesh, P("data")))
        return bound(x_T, sampler_key, offset) if sampler.stochastic else bound(x_T)

    generate = jax.jit(generate, out_shardings=NamedSharding(mesh, P("data")))
    logging.info(
        "sampling %d images with %s order %d, NFE %d (%d steps) in batches of %d",
        n, sampler.method, sampler.order, sampler.nfe, sampler.num_steps, batch,
    )  # fmt: skip
    chunks = []
    for offset in range(0, n, batch):
        x = np.asarray(jax.device_get(generate(params, jnp.int32(offset))))
        chunks.append(image_grid.to_uint8(data.postprocess(x, config.data.centered)))
        logging.info("  %d / %d", min(offset + batch, n), n)
    images = np.concatenate(chunks)[:n]

    tag = f"{sampler.method}{sampler.order}_nfe{sampler.nfe}_{config.sampler.grid or 'quadratic'}"
    out_dir = os.path.join(workdir, "samples", tag)
    os.makedirs(out_dir, exist_ok=True)
    npz_path = os.path.join(out_dir, "samples.npz")
    png_path = os.path.join(out_dir, "samples.png")
    if jax.process_index() == 0:
        np.savez_compressed(npz_path, samples=images, ts=sampler.ts, nfe=sampler.nfe)
        scale = max(1, 64 // config.data.image_size)
        image_grid.save_image_grid(images[:MAX_GRID], png_path, scale=scale)
    logging.info("wrote %s and %s", npz_path, png_path)
    return {"npz": npz_path, "png": png_path, "nfe": sampler.nfe, "shape": images.shape}


def run(config, workdir: str) -> None:
    sample(config, workdir)
