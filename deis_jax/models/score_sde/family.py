"""score_sde's networks (NCSN++, DDPM++, DDPM) as a model family: built from ``config.model``
with ``image_size`` / ``num_channels`` / ``centered`` from ``config.data``
(:data:`DATA_FIELDS_OF_MODEL`), loaded from a converted checkpoint directory or a raw score_sde
``checkpoint_<N>`` file (its ``params_ema``), unconditional, called with score_sde's time
input."""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
from absl import logging

from deis_jax.common.checks import ConfigError, require_choice
from deis_jax.common.precision import cast_params
from deis_jax.models import checkpoints
from deis_jax.models.features import apply_with_features
from deis_jax.models.registry import ModelFn
from deis_jax.models.score_sde import (
    DATA_FIELDS_OF_MODEL,
    KNOWN_MODEL_CONFIGS,
    MODEL_NAMES,
    abstract_params,
    get_model,
    get_model_config,
    published,
)
from deis_jax.sampling.wrappers import PREDICTIONS


def model_config(config) -> dict:
    """``config.model`` with ``image_size`` / ``num_channels`` / ``centered`` from
    ``config.data``, as :func:`deis_jax.models.score_sde.get_model` wants."""
    values = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    values.update({k: config.data[k] for k in DATA_FIELDS_OF_MODEL})
    return values


# Fields of a published model config that say where it comes from, not what the network is.
INFO_FIELDS = ("sde", "continuous", "score_sde_config", "checkpoint_dir", "ema_rate")


def published_model(config) -> str | None:
    """The name of the published score_sde model (``KNOWN_MODEL_CONFIGS``) whose network is
    the one ``config`` describes (same values of every field but :data:`INFO_FIELDS`), or
    None."""
    values = model_config(config)
    for name in KNOWN_MODEL_CONFIGS:
        known = get_model_config(name).to_dict()
        if all(values.get(k) == v for k, v in known.items() if k not in INFO_FIELDS):
            return name
    return None


def apply_for_sampling(
    net: nn.Module, params: Any, x: jax.Array, labels: jax.Array, *, features: bool = False
):
    """A score_sde network in eval mode (``labels``: its time input): ``out``, or with
    ``features=True`` ``(out, features)`` (``deis_jax.models.features.apply_with_features``)."""
    if features:
        return apply_with_features(net, params, x, labels)
    return net.apply({"params": params}, x, labels, train=False)


def _convert_hint(path: str) -> str:
    return (
        "convert a score_sde checkpoint_<N> file with python scripts/"
        f"convert_score_sde_checkpoint.py --checkpoint <file> --model_config <name> "
        f"--out {path}, or pass the checkpoint_<N> file itself"
    )


class ScoreSdeFamily:
    """The :class:`deis_jax.models.registry.ModelFamily` of score_sde's networks."""

    model_names = MODEL_NAMES
    trainable = True

    def validate(self, config) -> None:
        """The network builds; ``config.model.prediction``, when set, is a known one."""
        try:
            self.build(config)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"config.model is invalid: {err}") from None
        if config.model.get("prediction") is not None:
            require_choice(config, "model.prediction", PREDICTIONS)

    def build(self, config) -> nn.Module:
        return get_model(model_config(config))

    def prediction(self, config) -> str:
        """``config.model.prediction`` if set, else score_sde's rule: ``'score'`` for
        ``scale_by_sigma`` networks (VE NCSN++), ``'eps'`` otherwise."""
        prediction = config.model.get("prediction")
        if prediction is not None:
            return prediction
        return "score" if config.model.get("scale_by_sigma", False) else "eps"

    def num_classes(self, config) -> int:
        return 0

    def abstract_params(self, config, net: nn.Module) -> Any:
        return abstract_params(model_config(config))

    def check_checkpoint(self, config, path: str | None) -> None:
        """A raw score_sde file, or a converted directory with its metadata file."""
        if not path or os.path.isfile(path):
            return
        if not os.path.isdir(path):
            raise checkpoints.CheckpointNotFoundError(
                f"config.sampling.checkpoint: no file or directory at '{path}': "
                f"{_convert_hint(path)}"
            )
        if not os.path.isfile(os.path.join(path, checkpoints.METADATA_FILE)):
            raise checkpoints.CheckpointNotFoundError(
                f"config.sampling.checkpoint: '{path}' is not a converted checkpoint (it has "
                f"no {checkpoints.METADATA_FILE}): {_convert_hint(path)}"
            )

    def verify_checkpoint(self, config, path: str, net: nn.Module) -> None:
        if os.path.isfile(path):
            published.check_score_sde_params(path, model_config(config))
        else:
            checkpoints.check_converted_params(path, self.abstract_params(config, net))

    def load_checkpoint(self, config, path: str, net: nn.Module) -> Any:
        if os.path.isfile(path):
            logging.info("loading score_sde checkpoint %s (params_ema)", path)
            return published.load_score_sde_params(path, model_config(config))
        logging.info("loading converted parameters from %s", path)
        return published.load_converted_params(path, model_config(config))

    def without_checkpoint(self, config) -> str:
        """The published score_sde model to convert, when ``config`` describes one."""
        name = published_model(config)
        if name is None:
            return "or set config.sampling.checkpoint to a checkpoint of this model"
        folder = get_model_config(name).checkpoint_dir
        out = f"checkpoints/converted/{name}_<N>"
        return (
            f"or sample from the published score_sde model: download {folder}/checkpoint_<N> "
            f"from the 'Pretrained checkpoints' of {published.SCORE_SDE_URL} into "
            f"checkpoints/{folder}/, convert it with python scripts/"
            f"convert_score_sde_checkpoint.py --checkpoint checkpoints/{folder}/checkpoint_<N> "
            f"--model_config {name} --out {out} and set "
            f"--config.sampling.checkpoint={out}"
        )

    def model_fn(self, config, net: nn.Module, params: Any, labels: jax.Array | None) -> ModelFn:
        if labels is not None:
            raise ValueError(f"{type(net).__name__} is not class-conditional: pass no labels")
        compute = cast_params(params, net.dtype)  # once, outside the sampling loop
        return jax.tree_util.Partial(functools.partial(apply_for_sampling, net), compute)
