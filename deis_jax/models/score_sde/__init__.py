"""Flax score networks, parameter-compatible with the published score_sde checkpoints.

* :class:`NCSNpp` -- NCSN++ and DDPM++ (score_sde ``model.name = 'ncsnpp'``).
* :class:`DDPM` -- the original DDPM U-Net (``model.name = 'ddpm'``).
* :func:`get_model` -- build either from an ``ml_collections`` config with score_sde's field
  names; :func:`get_model_config` returns the configs of the published CIFAR-10 models.

Every network is called as ``model.apply({'params': params}, x, labels, train=False)`` with NHWC
images ``x`` and raw conditioning ``labels`` of shape ``(B,)``:

============================  ==================  ===========================================
model                         labels              output
============================  ==================  ===========================================
VP / sub-VP, continuous       ``999 * t``         eps (score = ``-output / sigma_t``)
VE, continuous                ``sigma(t)``        score (``scale_by_sigma=True``)
discrete models               integer step        eps (VP) / score (VE)
============================  ==================  ===========================================

Inputs are in [-1, 1] when ``centered`` (DDPM++ / DDPM) and in [0, 1] otherwise (NCSN++ VE);
the network rescales [0, 1] inputs to [-1, 1] internally.

Feature output: both networks sow their bottleneck -- the activation after the middle block
(ResBlock, Attn, ResBlock) at the lowest resolution ``H_low = image_size / 2**(L - 1)`` -- as
``intermediates['bottleneck']`` (read by ``deis_jax.models.features.apply_with_features``).
Sowing is a no-op unless that collection is mutable, so the parameters and the output are the
same either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deis_jax.common.precision import COMPUTE_DTYPES
from deis_jax.models.score_sde.configs import KNOWN_MODEL_CONFIGS, get_model_config
from deis_jax.models.score_sde.ddpm import DDPM
from deis_jax.models.score_sde.layers import NONLINEARITIES
from deis_jax.models.score_sde.ncsnpp import (
    EMBEDDING_TYPES,
    PROGRESSIVE,
    PROGRESSIVE_COMBINE,
    PROGRESSIVE_INPUT,
    RESBLOCK_TYPES,
    NCSNpp,
)

__all__ = [
    "DDPM",
    "KNOWN_MODEL_CONFIGS",
    "MODEL_NAMES",
    "NCSNpp",
    "abstract_params",
    "get_model",
    "get_model_config",
    "init_params",
]

MODEL_NAMES = ("ncsnpp", "ddpm")

_TUPLE_FIELDS = ("ch_mult", "attn_resolutions", "fir_kernel")


def _module_fields(module: type[nn.Module]) -> tuple[str, ...]:
    """The config fields a network accepts: its dataclass fields (Flax's own excluded)."""
    return tuple(f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name"))


# The data fields a model config takes from ``config.data`` (the single source of truth).
DATA_FIELDS_OF_MODEL = ("image_size", "num_channels", "centered")

_CHOICES = {
    "resblock_type": RESBLOCK_TYPES,
    "progressive": PROGRESSIVE,
    "progressive_input": PROGRESSIVE_INPUT,
    "progressive_combine": PROGRESSIVE_COMBINE,
    "embedding_type": EMBEDDING_TYPES,
    "attention_type": ("ddpm",),
    "normalization": ("GroupNorm",),
    "dtype": COMPUTE_DTYPES,
}


def _flat_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Model fields as a plain dict; a full score_sde config contributes ``data.*`` fields."""
    if "model" in config and "data" in config:
        values = dict(config["model"])
        for key in DATA_FIELDS_OF_MODEL:
            if key in config["data"] and key not in values:
                values[key] = config["data"][key]
        return values
    return dict(config)


def _validate(values: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    for field, allowed in _CHOICES.items():
        if field in values and values[field] not in allowed:
            raise ValueError(f"model.{field} must be one of {list(allowed)}, got {values[field]!r}")
    if "nonlinearity" in values and str(values["nonlinearity"]).lower() not in NONLINEARITIES:
        raise ValueError(
            f"model.nonlinearity must be one of {sorted(NONLINEARITIES)}, "
            f"got {values['nonlinearity']!r}"
        )
    if "centered" not in values:
        raise ValueError(
            "model config needs 'centered' (score_sde's data.centered: True for inputs in "
            "[-1, 1], as for DDPM++/DDPM; False for [0, 1], as for NCSN++ VE)"
        )
    kwargs = {}
    for field in fields:
        if field in values:
            value = values[field]
            if field in _TUPLE_FIELDS:
                value = tuple(int(v) for v in value)
            kwargs[field] = value
    return kwargs


def get_model(config: Mapping[str, Any]) -> nn.Module:
    """Build the Flax network described by a score_sde-style config.

    Args:
      config: either a model config (score_sde's ``config.model`` fields plus ``centered``
        and, for :func:`init_params`, ``image_size`` / ``num_channels``), e.g. from
        :func:`get_model_config`, or a full score_sde config with ``model`` and ``data``
        sub-configs. Fields the network does not use (``beta_min``, ``ema_rate``, ``sde``,
        ...) are ignored; architecture fields that are absent take score_sde's CIFAR-10
        DDPM++ values.

    Returns:
      An :class:`NCSNpp` (``name='ncsnpp'``) or :class:`DDPM` (``name='ddpm'``) module, to be
      called as ``model.apply({'params': p}, x, labels, train=False)``.

    Raises:
      ValueError: naming the field and the allowed values, for an unknown ``name`` or option.
    """
    values = _flat_model_config(config)
    name = values.get("name")
    if name == "ncsnpp":
        return NCSNpp(**_validate(values, _module_fields(NCSNpp)))
    if name == "ddpm":
        return DDPM(**_validate(values, _module_fields(DDPM)))
    raise ValueError(f"model.name must be one of {list(MODEL_NAMES)}, got {name!r}")


def _dummy_inputs(config: Mapping[str, Any], batch_size: int):
    values = _flat_model_config(config)
    missing = [k for k in ("image_size", "num_channels") if k not in values]
    if missing:
        raise ValueError(f"model config needs {missing} to build example inputs")
    size, channels = int(values["image_size"]), int(values["num_channels"])
    x = jnp.zeros((batch_size, size, size, channels), jnp.float32)
    labels = jnp.ones((batch_size,), jnp.float32)  # positive: VE models take log(sigma)
    return x, labels


def init_params(config: Mapping[str, Any], key: jax.Array, batch_size: int = 1) -> dict:
    """Freshly initialised parameters (the ``params`` collection) for ``config``."""
    model = get_model(config)
    x, labels = _dummy_inputs(config, batch_size)
    return model.init({"params": key}, x, labels, train=False)["params"]


def abstract_params(config: Mapping[str, Any]) -> dict:
    """The parameter tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves (no compute)."""
    model = get_model(config)
    x, labels = _dummy_inputs(config, 1)
    variables = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, x, labels, train=False)
    )
    return variables["params"]
