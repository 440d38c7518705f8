"""EDM's networks in experiment configs: the ``config.model`` fields, their checks, the
converted checkpoint they load and the call the samplers make.

    config.model.name = "edm"
    config.model.precond_class = "VPPrecond"          # VPPrecond | VEPrecond | EDMPrecond
    config.model.kwargs = {...}                       # EDM's constructor kwargs (init_kwargs)
    config.sampling.checkpoint = "checkpoints/converted/edm-cifar10-32x32-uncond-vp"
    config.sampling.labels = "random"                 # class-conditional models: random |
    config.sampling.class_label = 0                   #   fixed (class_label) | cycle
    config.sampling.guidance_scale = 1.0              # classifier-free guidance w

The network is EDM's denoiser ``D(x, sigma, class_labels)`` (an x0 prediction) on EDM's noise
schedule, alpha = 1 and sigma = t (``config.sde.name = 'edm'``): the sampler's time is the
sigma the preconditioner takes, and ``eps = (x - D) / sigma``
(``deis_jax.sampling.wrappers``). A class-conditional network gets ``one_hot(labels)``: the
labels of the rows are an argument of each call (``eps_fn(x, t, labels=labels)``, which the
samplers and fitters pass row by row), or bound with the parameters for a fixed batch
(``LoadedModel.bind(params, labels)``); they are drawn per sample by
``deis_jax.sampling.class_labels.ClassLabels``.

Classifier-free guidance with scale ``w`` evaluates the conditional and the null-label
(all-zero row, EDM's ``class_labels=None``) outputs in one call on a doubled batch and returns
``D_u + w (D_c - D_u)``; as eps is affine in D with the same coefficients for both, this is
the same as guiding eps. ``w = 1`` is the plain conditional model (one call). The published
ImageNet-64 model was trained without label dropout, so its null-label output is not an
unconditional model: guidance is there for models that were.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deis_jax.common.checks import ConfigError
from deis_jax.common.precision import COMPUTE_DTYPES, cast_params
from deis_jax.models import checkpoints
from deis_jax.models.edm.convert import SOURCE, load_params_of
from deis_jax.models.edm.precond import PRECOND_CLASSES, abstract_params, edm_network_from_kwargs
from deis_jax.models.features import apply_with_features
from deis_jax.models.registry import ModelFn

MODEL_NAME = "edm"
CONVERT_HINT = (
    "convert EDM's pickle with python scripts/convert_edm_checkpoint.py --pickle "
    "<edm-....pkl> --edm-source <clone of github.com/NVlabs/edm> --out <dir>"
)


def _kwargs(config) -> dict[str, Any]:
    kwargs = config.model.get("kwargs")
    if kwargs is None:
        raise ConfigError(
            "config.model.kwargs must hold EDM's constructor kwargs (a pickle's "
            "net.init_kwargs, e.g. configs/edm_cifar10_vp.py), got None"
        )
    values = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def build_edm_model(config):
    """The Flax preconditioner + U-Net of ``config.model`` (``ConfigError`` naming a bad
    ``precond_class`` or kwarg)."""
    precond_class = config.model.get("precond_class")
    try:
        return edm_network_from_kwargs(precond_class, _kwargs(config))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config.model (EDM): {err}") from None


def validate_edm_model(config) -> None:
    """``config.model`` builds, and ``config.data`` agrees with it (image size, channels,
    centred [-1, 1] data as EDM trains on)."""
    if config.model.get("precond_class") not in PRECOND_CLASSES:
        raise ConfigError(
            f"config.model.precond_class must be one of {list(PRECOND_CLASSES)}, got "
            f"{config.model.get('precond_class')!r}"
        )
    net = build_edm_model(config)
    for data_field, value in (
        ("image_size", net.img_resolution),
        ("num_channels", net.img_channels),
    ):
        if config.data[data_field] != value:
            raise ConfigError(
                f"config.data.{data_field} must be {value} for this EDM network "
                f"(config.model.kwargs), got {config.data[data_field]!r}"
            )
    if config.data.centered is not True:
        raise ConfigError("config.data.centered must be True for EDM networks (data in [-1, 1])")
    compute_dtype(config)


def compute_dtype(config) -> str:
    """``config.model.dtype``; when unset, EDM's ``use_fp16`` rule: ``'float16'`` if the
    constructor kwargs set it, else ``'float32'`` (``ConfigError`` for another value)."""
    dtype = config.model.get("dtype")
    if dtype is None:
        dtype = "float16" if _kwargs(config).get("use_fp16") else "float32"
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            f"config.model.dtype must be one of {list(COMPUTE_DTYPES)}, got {dtype!r}"
        )
    return dtype


def label_dim(config) -> int:
    """The number of classes of a conditional EDM network (0: unconditional)."""
    return int(_kwargs(config).get("label_dim", 0) or 0)


def check_edm_checkpoint(config) -> None:
    """``config.sampling.checkpoint`` is a converted EDM checkpoint of ``config.model``:
    ``ConfigError`` naming every constructor kwarg that differs."""
    path = config.sampling.get("checkpoint")
    if not path:
        raise ConfigError(
            "config.sampling.checkpoint must name a converted EDM checkpoint (EDM networks are "
            "not trained here): convert the published pickle with "
            "python scripts/convert_edm_checkpoint.py --pickle <file.pkl> --edm-source <edm "
            "clone> --out <dir>"
        )
    if os.path.isfile(path):
        raise checkpoints.CheckpointNotFoundError(
            f"config.sampling.checkpoint: '{path}' is a file; EDM networks load from a "
            f"converted checkpoint directory: {CONVERT_HINT} and pass <dir>"
        )
    if not os.path.isdir(path):
        raise checkpoints.CheckpointNotFoundError(
            f"config.sampling.checkpoint: no file or directory at '{path}': {CONVERT_HINT}"
        )
    if not os.path.isfile(os.path.join(path, checkpoints.METADATA_FILE)):
        raise checkpoints.CheckpointNotFoundError(
            f"config.sampling.checkpoint: '{path}' is not a converted checkpoint (it has no "
            f"{checkpoints.METADATA_FILE}): {CONVERT_HINT}"
        )
    meta = checkpoints.load_params_metadata(path)
    if meta.get("source") != SOURCE:
        raise ConfigError(
            f"config.sampling.checkpoint: '{path}' is not a converted EDM checkpoint (source "
            f"{meta.get('source')!r}); convert it with scripts/convert_edm_checkpoint.py"
        )
    ours = {"precond_class": config.model.precond_class, **_kwargs(config)}
    theirs = {"precond_class": meta.get("precond_class"), **meta.get("constructor_kwargs", {})}
    differ = [
        f"{key}: {theirs.get(key)!r} (checkpoint) vs {ours.get(key)!r} (config)"
        for key in sorted(set(ours) | set(theirs))
        if key != "dropout" and _normal(theirs.get(key)) != _normal(ours.get(key))
    ]
    if differ:
        raise ConfigError(
            f"config.model does not describe the EDM checkpoint '{path}': "
            + "; ".join(differ)
            + " (copy the checkpoint's constructor_kwargs from its "
            f"{checkpoints.METADATA_FILE} into config.model.kwargs)"
        )


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def _one_hot(net, labels: jax.Array | None) -> jax.Array | None:
    if labels is None or not net.label_dim:
        return None
    return jax.nn.one_hot(labels, net.label_dim, dtype=jnp.float32)


def apply_edm(
    net,
    guidance_scale: float,
    params: Any,
    x: jax.Array,
    sigma: jax.Array,
    *,
    labels: jax.Array | None = None,
    features: bool = False,
):
    """``D(x, sigma)`` with the class ``labels`` (int, ``(B,)``; None: the null label), guided
    with ``guidance_scale`` (see the module docstring); with ``features=True`` ``(D,
    features)``, the bottleneck feature of the conditional call."""
    class_labels = _one_hot(net, labels)
    w = float(guidance_scale)
    if w != 1.0 and class_labels is not None:
        n = x.shape[0]
        x = jnp.concatenate([x, x])
        sigma = jnp.concatenate([jnp.broadcast_to(sigma, (n,))] * 2)
        class_labels = jnp.concatenate([class_labels, jnp.zeros_like(class_labels)])
    if features:
        out, feats = apply_with_features(net, params, x, sigma, class_labels=class_labels)
    else:
        out, feats = net.apply({"params": params}, x, sigma, class_labels), None
    if w != 1.0 and class_labels is not None:
        n = out.shape[0] // 2
        out = out[n:] + w * (out[:n] - out[n:])
        feats = None if feats is None else feats[:n]
    return (out, feats) if features else out


class EdmFamily:
    """The :class:`deis_jax.models.registry.ModelFamily` of EDM's networks (sampled from
    converted checkpoints, not trained here)."""

    model_names = (MODEL_NAME,)
    trainable = False

    def validate(self, config) -> None:
        validate_edm_model(config)

    def build(self, config) -> nn.Module:
        return build_edm_model(config)

    def prediction(self, config) -> str:
        return "x0"

    def num_classes(self, config) -> int:
        return label_dim(config)

    def abstract_params(self, config, net: nn.Module) -> Any:
        return abstract_params(net)

    def check_checkpoint(self, config, path: str | None) -> None:
        check_edm_checkpoint(config)

    def verify_checkpoint(self, config, path: str, net: nn.Module) -> None:
        checkpoints.check_converted_params(path, abstract_params(net))

    def load_checkpoint(self, config, path: str, net: nn.Module) -> Any:
        check_edm_checkpoint(config)
        return load_params_of(net, path)

    def without_checkpoint(self, config) -> str:
        """EDM's networks are converted, not trained here."""
        return CONVERT_HINT

    def model_fn(self, config, net: nn.Module, params: Any, labels: jax.Array | None) -> ModelFn:
        guidance = config.sampling.get("guidance_scale") or 1.0
        apply = functools.partial(apply_edm, net, float(guidance))
        compute = cast_params(params, compute_dtype(config))  # once, outside the sampling loop
        if labels is None:  # the rows' labels come with each call (labels=...), or none
            return jax.tree_util.Partial(apply, compute)
        return jax.tree_util.Partial(apply, compute, labels=labels)
