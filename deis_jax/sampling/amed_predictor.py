r"""AMED predictor networks (AMED-Solver / AMED-Plugin, Zhou et al., CVPR 2024).

AMED learns, for every step ``t_c -> t_x`` of a PF-ODE solver (EDM variables, ``rho = sigma``),
where the "mean direction" of the step is taken. A tiny network predicts three factors:

* ``r`` in (0, 1): the intermediate time ``s = t_x**r * t_c**(1 - r)`` (geometric
  interpolation, i.e. ``r`` is the fraction of the step in ``log sigma``),
* ``c`` in [1 - delta_c, 1 + delta_c] (``scale_dir``): a magnitude factor on the update,
* ``a`` in [1 - delta_a, 1 + delta_a] (``scale_time``): a factor on the sigma fed to the network
  at the intermediate point.

Two modules share one call signature ``module.apply({'params': p}, features, rho_cur, rho_next,
step) -> (r, c, a)``, each output of shape ``(B,)``:

:class:`AmedPredictor` (``kind = "bottleneck"``) -- the network of the paper. With ``h`` the
concatenated 20 features,

.. math::

    e(\rho) &= \mathrm{SiLU}\big(W_t\,[\cos(\rho\,\omega), \sin(\rho\,\omega)] + b_t\big),
        \qquad \omega_k = 10000^{-k/(H-1)},\ k = 0..H-1,\ H = \text{time\_channels}/2, \\
    g &= W_2\,\mathrm{SiLU}(W_1 f + b_1) + b_2, \\
    h &= [e(\rho_\text{cur}), e(\rho_\text{next}), g] \in \mathbb{R}^{2\cdot 8 + 4 = 20}, \\
    r &= \sigma(w_r^\top h + b_r), \\
    c &= (1 - \delta_c) + 2\delta_c\,\sigma(w_c^\top h + b_c)
       = 1 + \delta_c \tanh\big((w_c^\top h + b_c)/2\big), \\
    a &= (1 - \delta_a) + 2\delta_a\,\sigma(w_a^\top h + b_a),

where ``f`` is the channel mean of the score network's lowest-resolution (8x8) activation,
flattened (64 features), ``rho`` is the raw noise level ``sigma`` (no log) and the time embedding
``e`` uses the **same** ``W_t, b_t`` for both end points. The ``c`` head exists only when
``delta_c = scale_dir > 0`` and the ``a`` head only when ``delta_a = scale_time > 0``; otherwise
the factor is exactly 1. The time Dense has a Xavier-uniform kernel, every other Dense an
``N(0, 1/fan_in)`` kernel; all biases start at zero. With F = 64 the network has 8,929
parameters (r head only), 8,950 (one extra head) or 8,971 (both heads).

:class:`StepwisePredictor` (``kind = "stepwise"``) -- a feature-free variant for models without a
bottleneck (e.g. exact-score Gaussian mixtures): one learned logit per step and per head,
``r = sigmoid(r_logit[step])`` and ``c, a`` as above, broadcast over the batch.

**Initialisation = DPM-Solver-2 start.** The heads are affine maps of ``h``; with zero logits
``r = 1/2`` (``s = sqrt(t_c t_x)``) and ``c = a = 1``, for which the AMED-Solver step is exactly
DPM-Solver-2. The stepwise logits start at zero, so it starts there exactly; the bottleneck
network starts near there (zero biases, small random weights), and exactly there if all its
weights are zero.

The bounded map is written as ``1 + delta * tanh(x / 2)`` (see :func:`bounded_scale`), which is
the same function as ``(1 - delta) + 2 delta sigmoid(x)`` but gives exactly 1 at ``x = 0`` in
floating point.

Parameters are a plain Flax ``params`` dict (see :func:`init_predictor`); the module can be
rebuilt from :func:`predictor_settings` / :func:`predictor_from_settings`, whose dict is JSON-able.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AmedPredictor",
    "PREDICTOR_KINDS",
    "StepwisePredictor",
    "bounded_scale",
    "init_predictor",
    "predictor_from_settings",
    "predictor_settings",
    "sinusoidal_embedding",
]

ArrayLike = jax.Array | np.ndarray | float | int

PREDICTOR_KINDS: tuple[str, ...] = ("bottleneck", "stepwise")

# Fields of each kind, with their defaults (``None``: required).
_FIELDS: dict[str, dict[str, Any]] = {
    "bottleneck": {
        "scale_dir": 0.0,
        "scale_time": 0.0,
        "hidden": 128,
        "time_channels": 8,
        "feature_out": 4,
    },
    "stepwise": {"num_steps": None, "scale_dir": 0.0, "scale_time": 0.0},
}


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------


def bounded_scale(logit: jax.Array, delta: float) -> jax.Array:
    """``(1 - delta) + 2 delta sigmoid(logit)``, a factor in [1 - delta, 1 + delta].

    Computed as the identical ``1 + delta * tanh(logit / 2)`` so that ``logit = 0`` (or
    ``delta = 0``) gives exactly 1.
    """
    logit = jnp.asarray(logit)
    return 1.0 + delta * jnp.tanh(0.5 * logit)


def sinusoidal_embedding(rho: jax.Array, channels: int) -> jax.Array:
    """Sinusoidal embedding ``[cos(rho w), sin(rho w)]`` of shape ``rho.shape + (channels,)``.

    ``w_k = 10000 ** (-k / (half - 1))`` for ``k = 0..half-1`` with ``half = channels // 2`` (the
    frequencies include both end points 1 and 1e-4). ``channels`` must be even and at least 4.
    """
    _check_time_channels(channels)
    half = channels // 2
    rho = jnp.asarray(rho)
    if not jnp.issubdtype(rho.dtype, jnp.floating):
        rho = rho.astype(jnp.float32)
    exponents = jnp.arange(half, dtype=rho.dtype) / (half - 1)
    freqs = jnp.power(jnp.asarray(1e-4, rho.dtype), exponents)
    angles = rho[..., None] * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _float_dtype(x: jax.Array) -> Any:
    """The compute dtype for inputs ``x``: at least float32 (float64 stays float64)."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.promote_types(x.dtype, jnp.float32)
    return jnp.float32


def _batch_noise_level(rho: ArrayLike, batch: int, dtype: Any) -> jax.Array:
    """A scalar (or per-sample ``(B,)``) noise level as a ``(B,)`` array."""
    return jnp.broadcast_to(jnp.asarray(rho, dtype=dtype), (batch,))


def _batch_size(features: jax.Array) -> int:
    if features.ndim < 1:
        raise ValueError(f"features must have a leading batch axis, got shape {features.shape}")
    return features.shape[0]


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def _check_scale(name: str, value: Any) -> float:
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and 0.0 <= float(value) < 1.0
    )
    if not ok:
        raise ValueError(f"{name} must be a real number in [0, 1), got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: Any) -> int:
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_time_channels(value: Any) -> int:
    value = _check_positive_int("time_channels", value)
    if value < 4 or value % 2:
        raise ValueError(f"time_channels must be an even int >= 4, got {value!r}")
    return value


_CHECKS = {
    "scale_dir": lambda v: _check_scale("scale_dir", v),
    "scale_time": lambda v: _check_scale("scale_time", v),
    "hidden": lambda v: _check_positive_int("hidden", v),
    "feature_out": lambda v: _check_positive_int("feature_out", v),
    "num_steps": lambda v: _check_positive_int("num_steps", v),
    "time_channels": _check_time_channels,
}


def _validated_fields(kind: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``values`` (fields of ``kind``, missing ones take their defaults)."""
    fields = _FIELDS[kind]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown field(s) {unknown} for predictor kind {kind!r}; "
            f"allowed fields are {sorted(fields)}"
        )
    out: dict[str, Any] = {}
    for name, default in fields.items():
        if name not in values and default is None:
            raise ValueError(f"{name} is required for predictor kind {kind!r}")
        out[name] = _CHECKS[name](values.get(name, default))
    return out


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------


class AmedPredictor(nn.Module):
    """The AMED predictor network fed with the score network's bottleneck feature.

    Attributes:
        scale_dir: ``delta_c`` in [0, 1); 0 disables the ``c`` head (``c = 1``).
        scale_time: ``delta_a`` in [0, 1); 0 disables the ``a`` head (``a = 1``).
        hidden: width of the feature branch's hidden layer.
        time_channels: channels of the sinusoidal time embedding (even, >= 4).
        feature_out: output width of the feature branch.
    """

    scale_dir: float = 0.0
    scale_time: float = 0.0
    hidden: int = 128
    time_channels: int = 8
    feature_out: int = 4

    @nn.compact
    def __call__(
        self,
        features: jax.Array,
        rho_cur: ArrayLike,
        rho_next: ArrayLike,
        step: ArrayLike | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Predict ``(r, c, a)``, each ``(B,)``.

        Args:
            features: ``(B, F)`` bottleneck features (trailing axes are flattened, so ``(B, 8, 8)``
                also works); all zeros on an AFS step.
            rho_cur, rho_next: noise levels (EDM sigma) of the step's two end points, scalars
                broadcast over the batch (``(B,)`` is accepted too).
            step: integer step index; unused here, accepted for a common signature.
        """
        del step
        _validated_fields("bottleneck", self._fields())
        features = jnp.asarray(features)
        batch = _batch_size(features)
        dtype = _float_dtype(features)
        x = features.reshape(batch, -1).astype(dtype)

        hidden_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        zeros = nn.initializers.zeros

        def dense(width: int, name: str) -> nn.Dense:
            return nn.Dense(width, kernel_init=hidden_init, bias_init=zeros, name=name)

        # One Dense, applied to both end points: the time weights are shared.
        time_dense = nn.Dense(
            self.time_channels,
            kernel_init=nn.initializers.glorot_uniform(),
            bias_init=zeros,
            name="time_embed",
        )

        def embed(rho: ArrayLike) -> jax.Array:
            emb = sinusoidal_embedding(_batch_noise_level(rho, batch, dtype), self.time_channels)
            return nn.silu(time_dense(emb))

        g = dense(self.feature_out, "feat_out")(nn.silu(dense(self.hidden, "feat_hidden")(x)))
        h = jnp.concatenate([embed(rho_cur), embed(rho_next), g], axis=-1)

        r = nn.sigmoid(dense(1, "r_head")(h)[:, 0])
        ones = jnp.ones_like(r)
        c = bounded_scale(dense(1, "c_head")(h)[:, 0], self.scale_dir) if self.scale_dir else ones
        a = bounded_scale(dense(1, "a_head")(h)[:, 0], self.scale_time) if self.scale_time else ones
        return r, c, a

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS["bottleneck"]}


class StepwisePredictor(nn.Module):
    """Feature-free AMED predictor: one learned logit per step and head.

    ``r = sigmoid(r_logit[step])``, ``c = bounded_scale(c_logit[step], scale_dir)`` and
    ``a = bounded_scale(a_logit[step], scale_time)``, broadcast over the batch. All logits start
    at zero (``r = 1/2``, ``c = a = 1``: DPM-Solver-2).

    Attributes:
        num_steps: number of solver intervals (valid steps are ``0..num_steps-1``).
        scale_dir: ``delta_c`` in [0, 1); 0 disables ``c_logit`` (``c = 1``).
        scale_time: ``delta_a`` in [0, 1); 0 disables ``a_logit`` (``a = 1``).
    """

    num_steps: int
    scale_dir: float = 0.0
    scale_time: float = 0.0

    @nn.compact
    def __call__(
        self,
        features: jax.Array,
        rho_cur: ArrayLike,
        rho_next: ArrayLike,
        step: ArrayLike,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Predict ``(r, c, a)``, each ``(B,)``.

        Args:
            features: any ``(B, ...)`` array; only its batch size (and float dtype) is used.
            rho_cur, rho_next: unused, accepted for a common signature.
            step: step index in ``0..num_steps-1``; may be traced (``jax.jit``). A concrete
                out-of-range index raises ``ValueError``; a traced one yields NaN outputs.
        """
        del rho_cur, rho_next
        _validated_fields("stepwise", self._fields())
        features = jnp.asarray(features)
        batch = _batch_size(features)
        dtype = _float_dtype(features)
        step = jnp.asarray(step)
        if not jnp.issubdtype(step.dtype, jnp.integer):
            raise ValueError(f"step must be an integer index, got dtype {step.dtype}")
        if not isinstance(step, jax.core.Tracer):
            bad = np.asarray(step)
            if np.any((bad < 0) | (bad >= self.num_steps)):
                raise ValueError(f"step must be in [0, {self.num_steps}), got {bad.tolist()}")
        valid = (step >= 0) & (step < self.num_steps)
        index = jnp.clip(step, 0, self.num_steps - 1)

        def logit(name: str) -> jax.Array:
            table = self.param(name, nn.initializers.zeros, (self.num_steps,), jnp.float32)
            value = jnp.where(valid, jnp.take(table, index), jnp.nan).astype(dtype)
            return jnp.broadcast_to(value, (batch,))

        r = nn.sigmoid(logit("r_logit"))
        ones = jnp.ones_like(r)
        c = bounded_scale(logit("c_logit"), self.scale_dir) if self.scale_dir else ones
        a = bounded_scale(logit("a_logit"), self.scale_time) if self.scale_time else ones
        return r, c, a

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS["stepwise"]}


# ------------------------------------------------------------------------------------------------
# Construction, initialisation and settings
# ------------------------------------------------------------------------------------------------


def init_predictor(
    module: AmedPredictor | StepwisePredictor,
    key: jax.Array,
    num_features: int | None = None,
) -> dict[str, Any]:
    """Initialise ``module`` with dummy inputs and return its ``params`` dict.

    Apply it as ``module.apply({'params': params}, features, rho_cur, rho_next, step)``.
    ``num_features`` (F, e.g. 64) is required for :class:`AmedPredictor` and ignored by
    :class:`StepwisePredictor`.
    """
    if isinstance(module, AmedPredictor):
        if num_features is None:
            raise ValueError("num_features is required to initialise an AmedPredictor")
        width = _check_positive_int("num_features", num_features)
    elif isinstance(module, StepwisePredictor):
        width = 1
    else:
        raise TypeError(f"expected an AmedPredictor or StepwisePredictor, got {type(module)}")
    features = jnp.zeros((1, width), jnp.float32)
    variables = module.init(key, features, 1.0, 0.5, 0)
    return variables["params"]


def predictor_settings(module: AmedPredictor | StepwisePredictor) -> dict[str, Any]:
    """JSON-able settings ``{"kind": ..., <fields>}`` that rebuild ``module``."""
    if isinstance(module, AmedPredictor):
        kind = "bottleneck"
    elif isinstance(module, StepwisePredictor):
        kind = "stepwise"
    else:
        raise TypeError(f"expected an AmedPredictor or StepwisePredictor, got {type(module)}")
    return {"kind": kind, **_validated_fields(kind, module._fields())}


def predictor_from_settings(settings: Mapping[str, Any]) -> AmedPredictor | StepwisePredictor:
    """Rebuild a predictor from :func:`predictor_settings` output (missing fields: defaults).

    Raises ``ValueError`` naming the offending field for an unknown ``kind``, an unknown field or
    a bad value (``scale_dir``/``scale_time`` in [0, 1); ``hidden``, ``feature_out``,
    ``num_steps`` positive ints; ``time_channels`` an even int >= 4).
    """
    if not isinstance(settings, Mapping):
        raise ValueError(f"predictor settings must be a dict, got {type(settings).__name__}")
    kind = settings.get("kind")
    if kind not in PREDICTOR_KINDS:
        raise ValueError(f"kind must be one of {PREDICTOR_KINDS}, got {kind!r}")
    fields = _validated_fields(kind, {k: v for k, v in settings.items() if k != "kind"})
    if kind == "bottleneck":
        return AmedPredictor(**fields)
    return StepwisePredictor(**fields)
