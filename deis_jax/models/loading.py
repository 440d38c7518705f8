"""From an experiment config to a network and its parameters, ready to sample with.

    model = loading.load_model(config, workdir, schedule)   # a LoadedModel
    eps_fn = model.bind(model.params)                       # x, t -> eps, for any sampler
    eps, feats = wrappers.eps_with_features(eps_fn, x, t)   # and the bottleneck feature (AMED)

* :func:`model_config` / :func:`build_model` -- the Flax network of ``config.model``, with
  ``image_size`` / ``num_channels`` / ``centered`` (:data:`DATA_FIELDS_OF_MODEL`) taken from
  ``config.data``, the single source of truth for them.
* :func:`model_prediction` -- what the network outputs (``eps`` / ``score`` / ...).
* :func:`validate_model_and_data` -- the config checks of ``config.data`` and ``config.model``
  (``ConfigError`` naming the field), shared by the train, sample and table modes.
* :func:`load_sampling_params` -- ``config.sampling.checkpoint`` (a converted score_sde
  directory or a raw score_sde ``checkpoint_<N>`` file) or else the EMA parameters of the
  latest training checkpoint under ``<workdir>/checkpoints``.
* :func:`load_model` -- the network, its parameters (those, or an untrained network's) and an
  ``identity`` for result caches (which weights, with :func:`params_digest` of their bytes).

The parameters stay separate from the network (``bind(params)``) so that jitted samplers take
them as arguments instead of baking them into the executable as constants.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from deis_jax import data
from deis_jax.config_validation import ConfigError, get_field, require_choice, require_number
from deis_jax.models import DATA_FIELDS_OF_MODEL, apply_with_features, checkpoints, get_model
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.sampling.wrappers import PREDICTIONS, EpsFn, eps_fn_from_model
from deis_jax.training import train as training

PARAMS_SOURCES = ("checkpoint", "random")
BOOL = (True, False)


def model_config(config) -> dict:
    """``config.model`` with ``image_size`` / ``num_channels`` / ``centered`` from
    ``config.data``, as :func:`deis_jax.models.get_model` wants."""
    values = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    values.update({k: config.data[k] for k in DATA_FIELDS_OF_MODEL})
    return values


def build_model(config) -> nn.Module:
    """The Flax network of ``config`` (``ValueError`` naming a bad ``model.*`` field)."""
    return get_model(model_config(config))


def model_prediction(config) -> str:
    """What the network outputs: ``config.model.prediction`` if set, else score_sde's rule:
    ``'score'`` for ``scale_by_sigma`` networks (VE NCSN++), ``'eps'`` otherwise (score =
    -output / sigma, VP / sub-VP DDPM++)."""
    prediction = config.model.get("prediction")
    if prediction is not None:
        return prediction
    return "score" if config.model.get("scale_by_sigma", False) else "eps"


def image_shape(config) -> tuple[int, int, int]:
    """``(H, W, C)`` of one image of ``config.data``."""
    size = int(config.data.image_size)
    return size, size, int(config.data.num_channels)


def validate_model_and_data(config) -> None:
    """Check ``config.data`` and ``config.model`` (``ConfigError`` naming the field)."""
    name = require_choice(config, "data.name", data.DATASETS)
    require_number(config, "data.image_size", integer=True, minimum=1)
    channels = require_number(config, "data.num_channels", integer=True, minimum=1)
    if channels != data.NUM_CHANNELS[name]:
        raise ConfigError(
            f"config.data.num_channels must be {data.NUM_CHANNELS[name]} for dataset "
            f"{name!r}, got {channels!r}"
        )
    require_choice(config, "data.centered", BOOL)
    require_choice(config, "data.random_flip", BOOL)
    get_field(config, "model")
    try:
        build_model(config)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config.model is invalid: {err}") from None
    if config.model.get("prediction") is not None:
        require_choice(config, "model.prediction", PREDICTIONS)


# --- parameters ---------------------------------------------------------------------------


def _missing_training_checkpoint(directory: str) -> FileNotFoundError:
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


def load_sampling_params(config, workdir: str, model: nn.Module | None = None) -> Any:
    """The parameters to sample with: ``config.sampling.checkpoint`` when set (a converted
    score_sde directory, or a raw score_sde ``checkpoint_<N>`` msgpack file: its
    ``params_ema``), else the EMA parameters of the latest checkpoint in
    ``<workdir>/checkpoints`` (``FileNotFoundError`` saying how to get one when there is
    none). ``model`` (default: :func:`build_model`) gives the tree to restore into."""
    path = config.sampling.get("checkpoint")
    if path:
        if os.path.isfile(path):
            logging.info("loading score_sde checkpoint %s (params_ema)", path)
            return checkpoints.load_score_sde_params(path, model_config(config))
        logging.info("loading converted parameters from %s", path)
        return checkpoints.load_params(path, model_config(config))

    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise _missing_training_checkpoint(directory)
    model = build_model(config) if model is None else model
    tx = training.optimizer_from_config(config.training)
    shape = image_shape(config)
    target = jax.eval_shape(lambda: training.init_state(model, tx, jax.random.PRNGKey(0), shape))
    mngr = training.checkpoint_manager(directory)
    try:
        state = training.restore_state(mngr, target)
        if state is None:
            raise _missing_training_checkpoint(directory)
        logging.info("restored EMA parameters from %s at step %d", directory, int(state.step))
        return state.ema_params
    finally:
        mngr.close()


def latest_step(workdir: str) -> int | None:
    """The latest training checkpoint step under ``<workdir>/checkpoints`` (None: none)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
    return max(steps) if steps else None


def params_digest(params: Any) -> str:
    """sha256 of every parameter's path, dtype, shape and bytes (a result cache identifies the
    weights themselves, not just a checkpoint step that a retraining would reuse)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


# --- the model to sample with -------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    """A noise prediction with its parameters kept apart: ``bind(params) -> eps_fn(x, t)``
    (pass ``params`` into the jitted sampler as an argument); ``identity`` (JSON-able) says
    which network and weights these are, for result caches. The eps functions of
    :func:`load_model` also give the network's bottleneck feature,
    ``deis_jax.sampling.wrappers.eps_with_features(eps_fn, x, t) -> (eps, features)``."""

    bind: Callable[[Any], EpsFn]
    params: Any
    identity: dict

    def eps_fn(self) -> EpsFn:
        """The noise prediction with :attr:`params` bound."""
        return self.bind(self.params)


def _apply_for_sampling(
    model: nn.Module, params: Any, x: jax.Array, labels: jax.Array, *, features: bool = False
):
    """The network in eval mode: ``out``, or with ``features=True`` ``(out, features)`` (the
    bottleneck feature of :func:`deis_jax.models.apply_with_features`)."""
    if features:
        return apply_with_features(model, params, x, labels)
    return model.apply({"params": params}, x, labels, train=False)


def load_model(
    config, workdir: str, schedule: NoiseSchedule, *, params: str = "checkpoint"
) -> LoadedModel:
    """The network of ``config`` as a noise prediction under ``schedule``.

    ``params='checkpoint'``: :func:`load_sampling_params`; ``'random'``: an untrained network
    initialised from ``PRNGKey(config.seed)`` (smoke tests only)."""
    if params not in PARAMS_SOURCES:
        raise ValueError(f"params must be one of {PARAMS_SOURCES}, got {params!r}")
    model = build_model(config)
    if params == "random":
        logging.warning("config.eval.params='random': an UNTRAINED network (smoke test only)")
        key = jax.random.PRNGKey(config.seed)
        dummy = jnp.zeros((1, *image_shape(config)))
        values = model.init(key, dummy, jnp.ones((1,)), train=False)["params"]
        identity: dict = {"params": "random", "seed": config.seed}
    else:
        values = load_sampling_params(config, workdir, model)
        ckpt = config.sampling.get("checkpoint")
        identity = {"checkpoint": ckpt} if ckpt else {"workdir_step": latest_step(workdir)}
        identity["params_sha256"] = params_digest(values)
    identity["model"] = config.model.to_dict()
    prediction = model_prediction(config)

    apply = functools.partial(_apply_for_sampling, model)

    def bind(p) -> EpsFn:
        return eps_fn_from_model(jax.tree_util.Partial(apply, p), schedule, prediction)

    return LoadedModel(bind, values, identity)


def describe_model(identity: dict) -> str:
    """One line saying which weights a :class:`LoadedModel` ``identity`` names."""
    if identity.get("checkpoint"):
        where = f"checkpoint {identity['checkpoint']}"
    elif identity.get("workdir_step") is not None:
        where = f"workdir EMA parameters at step {identity['workdir_step']}"
    else:
        where = str(identity.get("params") or identity.get("model") or "given model")
    digest = identity.get("params_sha256")
    return where + (f" (params sha256 {digest[:12]}…)" if digest else "")
