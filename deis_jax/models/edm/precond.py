"""EDM's preconditioners (Karras et al., 2022, Table 1) as Flax modules around the U-Nets.

A preconditioner turns the raw network ``F`` into the denoiser

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), labels)

===========  ==================  ========================  ==================  ===============
precond      c_skip              c_out                     c_in                c_noise
===========  ==================  ========================  ==================  ===============
VPPrecond    1                   -s                        1/sqrt(s^2+1)       (M-1) s_inv(s)
VEPrecond    1                   s                         1                   ln(s/2)
EDMPrecond   sd^2/(s^2+sd^2)     s sd/sqrt(s^2+sd^2)       1/sqrt(s^2+sd^2)    ln(s)/4
===========  ==================  ========================  ==================  ===============

with ``s = sigma``, VP's ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` and
``s_inv(s) = (sqrt(beta_min^2 + 2 beta_d log(1 + s^2)) - beta_min) / beta_d`` (EDM's
``log(1 + s^2)`` form, not ``log1p``, so the float32 ``c_noise`` equals EDM's), and
``sd = sigma_data``. All in float32 like EDM.

Building and calling (NHWC images; ``precond_class`` and ``kwargs`` are the EDM constructor's,
i.e. a pickle's ``type(net).__name__`` and ``net.init_kwargs``)::

    net = edm_network_from_kwargs("VPPrecond", kwargs)
    params = init_params(net, key)  # or: net, params = load_edm_checkpoint(path)
    d = net.apply({"params": params}, x, sigma)                    # sigma: 0-d, (1,) or (B,)
    d = net.apply({"params": params}, x, sigma, class_labels=onehot)  # (B, label_dim)

``class_labels=None`` on a conditional network means an all-zero label row (EDM's rule);
``augment_labels=None`` means zeros. The U-Net shares the preconditioner's parameter scope,
so ``params`` is the U-Net's tree (torch names after ``model.``) and
``deis_jax.models.features.apply_with_features(net, params, x, sigma)`` returns ``(D, features)``.
The U-Net computes in its parameters' dtype: float32 parameters (the stored ones) give EDM's
float32 path; a bfloat16 / float16 copy (``deis_jax.common.precision.cast_params``, which the
EDM family makes for ``config.model.dtype``, float16 by default when EDM's ``use_fp16`` is set)
gives EDM's ``use_fp16`` path: ``c_in x`` and the coefficients in float32, the U-Net in the low
precision, its output cast to float32 before ``c_skip x + c_out F``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.common.precision import at_least_float32
from deis_jax.models.edm.unets import DhariwalUNet, SongUNet

__all__ = [
    "MODEL_TYPES",
    "PRECOND_ATTR_NAMES",
    "PRECOND_CLASSES",
    "EDMPrecond",
    "VEPrecond",
    "VPPrecond",
    "abstract_params",
    "edm_network_from_kwargs",
    "init_params",
    "precond_attrs",
]

Coefficients = tuple[Any, jax.Array, jax.Array, jax.Array]


class _Precond(nn.Module):
    """Fields and ``D`` shared by the preconditioners; subclasses define ``coefficients``."""

    model: nn.Module
    img_resolution: int
    img_channels: int
    label_dim: int = 0
    use_fp16: bool = False

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(
        self,
        x: jax.Array,
        sigma: jax.Array,
        class_labels: jax.Array | None = None,
        augment_labels: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """``D(x, sigma)`` for NHWC ``x``; ``sigma`` 0-d, ``(1,)`` or ``(B,)``."""
        x = jnp.asarray(x, jnp.float32)
        sigma = jnp.asarray(sigma, jnp.float32).reshape(-1, 1, 1, 1)
        if not self.label_dim:
            class_labels = None
        elif class_labels is None:
            class_labels = jnp.zeros((1, self.label_dim), jnp.float32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        f = self.model(c_in * x, c_noise.reshape(-1), class_labels, augment_labels, train=train)
        return c_skip * x + c_out * at_least_float32(f)

    def coefficients(self, sigma: jax.Array) -> Coefficients:
        """``(c_skip, c_out, c_in, c_noise)`` for float32 ``sigma`` (any shape)."""
        raise NotImplementedError


class VPPrecond(_Precond):
    """EDM's VP preconditioning (the DDPM++ VP checkpoints)."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    epsilon_t: float = 1e-5

    def sigma(self, t: float) -> np.float32:
        """VP ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` in float32 like EDM.

        The exponential is rounded once to float32 (numpy's float32 ``exp`` may be an ulp
        off, which the cancellation in ``exp - 1`` makes a 6 % error at ``t = 1e-5``).
        """
        t = np.float32(t)
        arg = np.float32(0.5 * float(self.beta_d) * t**2 + float(self.beta_min) * t)
        return np.sqrt(np.float32(np.exp(np.float64(arg))) - np.float32(1))

    def sigma_inv(self, sigma: jax.Array) -> jax.Array:
        """The VP time of ``sigma`` (EDM's ``log(1 + sigma^2)`` form)."""
        b, bmin = float(self.beta_d), float(self.beta_min)
        return (jnp.sqrt(bmin**2 + 2 * b * jnp.log(1 + sigma**2)) - bmin) / b

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(float(self.epsilon_t)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(1.0))

    def coefficients(self, sigma: jax.Array) -> Coefficients:
        c_in = 1 / jnp.sqrt(sigma**2 + 1)
        return 1, -sigma, c_in, (int(self.M) - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """EDM's VE preconditioning (the NCSN++ VE checkpoints)."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0

    def coefficients(self, sigma: jax.Array) -> Coefficients:
        return 1, sigma, jnp.ones_like(sigma), jnp.log(0.5 * sigma)


class EDMPrecond(_Precond):
    """EDM's own preconditioning (the ADM ImageNet checkpoint)."""

    sigma_min: float = 0.0
    sigma_max: float = math.inf
    sigma_data: float = 0.5

    def coefficients(self, sigma: jax.Array) -> Coefficients:
        sd = float(self.sigma_data)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / jnp.sqrt(sigma**2 + sd**2)
        c_in = 1 / jnp.sqrt(sd**2 + sigma**2)
        return c_skip, c_out, c_in, jnp.log(sigma) / 4


PRECOND_CLASSES: dict[str, type[_Precond]] = {
    "VPPrecond": VPPrecond,
    "VEPrecond": VEPrecond,
    "EDMPrecond": EDMPrecond,
}
MODEL_TYPES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
_DEFAULT_MODEL_TYPE = {
    "VPPrecond": "SongUNet",
    "VEPrecond": "SongUNet",
    "EDMPrecond": "DhariwalUNet",
}
_UNET_FROM_PRECOND = ("img_resolution", "in_channels", "out_channels", "label_dim")
_COMMON_ATTRS = (
    "img_resolution",
    "img_channels",
    "label_dim",
    "use_fp16",
    "sigma_min",
    "sigma_max",
)
_EXTRA_ATTRS = {
    "VPPrecond": ("beta_d", "beta_min", "M", "epsilon_t"),
    "EDMPrecond": ("sigma_data",),
}
# every attribute an unpickled EDM preconditioner may carry (what a conversion records)
PRECOND_ATTR_NAMES = _COMMON_ATTRS + tuple(a for names in _EXTRA_ATTRS.values() for a in names)


def _fields(cls: type[nn.Module], exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    skip = ("parent", "name", "model", *exclude)
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in skip)


def edm_network_from_kwargs(precond_class: str, kwargs: Mapping[str, Any]) -> _Precond:
    """The Flax preconditioner + U-Net of EDM's ``precond_class(**kwargs)``.

    Args:
      precond_class: ``'VPPrecond'``, ``'VEPrecond'`` or ``'EDMPrecond'``.
      kwargs: the constructor arguments (a pickle's ``net.init_kwargs``; the
        ``constructor_kwargs`` of EDM's fixture JSONs): the preconditioner's own
        (``img_resolution``, ``img_channels``, ``label_dim``, ``use_fp16``, its sigma / beta
        settings), ``model_type`` (default ``SongUNet`` for VP/VE, ``DhariwalUNet`` for EDM)
        and the U-Net's arguments (lists are turned into tuples).

    Raises:
      ValueError: naming an unknown class, model type or argument and the allowed values.
    """
    if precond_class not in PRECOND_CLASSES:
        raise ValueError(
            f"precond_class must be one of {list(PRECOND_CLASSES)}, got {precond_class!r}"
            + (" (iDDPMPrecond is not ported)" if precond_class == "iDDPMPrecond" else "")
        )
    cls = PRECOND_CLASSES[precond_class]
    kwargs = dict(kwargs)
    model_type = kwargs.pop("model_type", _DEFAULT_MODEL_TYPE[precond_class])
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {list(MODEL_TYPES)}, got {model_type!r}")
    unet_cls = MODEL_TYPES[model_type]
    own = {k: kwargs.pop(k) for k in _fields(cls) if k in kwargs}
    missing = [k for k in ("img_resolution", "img_channels") if k not in own]
    if missing:
        raise ValueError(f"{precond_class} kwargs need {missing}")
    allowed = _fields(unet_cls, _UNET_FROM_PRECOND)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown {precond_class}/{model_type} argument(s) {unknown}; allowed: "
            f"{sorted(_fields(cls)) + ['model_type'] + sorted(allowed)}"
        )
    unet = unet_cls(
        img_resolution=int(own["img_resolution"]),
        in_channels=int(own["img_channels"]),
        out_channels=int(own["img_channels"]),
        label_dim=int(own.get("label_dim", 0)),
        **{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in kwargs.items()},
    )
    return cls(model=unet, **own)


def precond_attrs(net: _Precond) -> dict[str, Any]:
    """The attributes an unpickled EDM preconditioner carries (``sigma_min``, ``sigma_max``,
    ``img_resolution``, ..., VP's ``beta_d`` / ``beta_min`` / ``M`` / ``epsilon_t``, EDM's
    ``sigma_data``), computed like EDM (VP's sigma range in float32)."""
    names = _COMMON_ATTRS + _EXTRA_ATTRS.get(type(net).__name__, ())
    return {name: getattr(net, name) for name in names}


def _example_inputs(net: _Precond) -> tuple[jax.Array, jax.Array]:
    r, c = int(net.img_resolution), int(net.img_channels)
    return jnp.zeros((1, r, r, c), jnp.float32), jnp.ones((1,), jnp.float32)


def init_params(net: _Precond, key: jax.Array) -> dict:
    """Freshly initialised parameters of ``net`` (not EDM's initialisation)."""
    return net.init({"params": key}, *_example_inputs(net))["params"]


def abstract_params(net: _Precond) -> dict:
    """``net``'s parameter tree as ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``)."""
    return jax.eval_shape(lambda: init_params(net, jax.random.key(0)))
