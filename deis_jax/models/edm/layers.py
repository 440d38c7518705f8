"""Layers of EDM's networks (Karras et al., 2022, ``training/networks.py``) in Flax, NHWC.

Every module names its parameters like the PyTorch original (``weight``, ``bias``) so that a
Flax parameter path is the PyTorch ``state_dict`` name split on ``'.'``; the leaves are in
Flax layout: conv kernels HWIO (torch OIHW), linear weights ``(in, out)`` (torch
``(out, in)``). Linear and convolution layers compute in their weights' dtype (float32, or a
low-precision copy from ``deis_jax.common.precision.cast_params``, EDM's ``use_fp16`` path);
GroupNorm and the attention softmax in float32 whatever the dtypes.

* :class:`Linear` -- ``y = x W + b``.
* :class:`Conv2d` -- a k x k convolution (k in {0, 1, 3}) with optional 2x up/down resampling
  by the fixed filter ``f = outer(f1, f1) / sum(f1)^2`` (:func:`resample_filter_2d`):

  - non-fused (every U-Net block conv and skip): resample, then the weight conv with padding
    ``k // 2``, then the bias. Down = depthwise correlation with ``f``, stride 2, padding
    ``(len(f1) - 1) // 2``; up = depthwise transposed convolution with ``4 f``, stride 2 (the
    input dilated by 2, padded ``len(f1) - 1 - f_pad`` per side, correlated with ``4 f``);
  - fused down (NCSN++ ``aux_residual``): the weight conv with padding ``k // 2 + f_pad``,
    then the depthwise ``f`` with stride 2 and no padding, then the bias;
  - ``kernel = 0``: no weight and no bias, a pure resample.

  ``resample_filter`` is derived from the taps and never stored.
* :class:`GroupNorm` -- ``G = min(32, C // 4)`` contiguous channel groups, biased variance over
  ``(H, W, C / G)``, per-channel affine ``weight`` / ``bias``.
* :class:`PositionalEmbedding` -- ``[cos(c f_i), sin(c f_i)]`` with
  ``f_i = (1 / 10000) ** (i / (n/2 - endpoint))`` (float32 like EDM).
* :class:`FourierEmbedding` -- ``[cos(c 2 pi f_i), sin(c 2 pi f_i)]`` with the stored random
  frequencies ``freqs`` (a parameter leaf here; a buffer in EDM that must be loaded).
* :class:`UNetBlock` -- EDM's residual block with optional multi-head self-attention (the
  SongUNet and ADM variants differ only in its fields; see the class docstring).

Dropout is the identity: these ports are for inference with published weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deis_jax.common.precision import at_least_float32, float32_unless_low, is_low_precision

__all__ = [
    "Conv2d",
    "FourierEmbedding",
    "GroupNorm",
    "Linear",
    "PositionalEmbedding",
    "UNetBlock",
    "multi_head_attention",
    "resample_filter_2d",
]

_DIMS = ("NHWC", "HWIO", "NHWC")
# EDM's default "kaiming_uniform", U(-sqrt(3 / fan_in), sqrt(3 / fan_in)), without its per-layer
# gains and zero-initialised layers: the ports are for loading trained weights.
_weight_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def resample_filter_2d(taps: Sequence[float]) -> np.ndarray:
    """EDM's 2-D resampling filter ``outer(f1, f1) / sum(f1)^2`` (float32, ``(k, k)``)."""
    f = np.asarray(taps, dtype=np.float32)
    return np.outer(f, f) / np.square(f.sum())


def _depthwise(x: jax.Array, kernel: np.ndarray, stride: int, pad: int, dilation: int):
    """Per-channel correlation of NHWC ``x`` with the 2-D ``kernel``.

    ``stride`` is the window stride; ``dilation`` inserts ``dilation - 1`` zeros between input
    pixels (a stride-``dilation`` transposed convolution); ``pad`` zeros on every side.
    """
    c = x.shape[-1]
    k = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, c)), x.dtype)
    return lax.conv_general_dilated(
        x,
        k,
        window_strides=(stride, stride),
        padding=[(pad, pad), (pad, pad)],
        lhs_dilation=(dilation, dilation),
        dimension_numbers=_DIMS,
        feature_group_count=c,
    )


def _conv(x: jax.Array, weight: jax.Array, pad: int) -> jax.Array:
    return lax.conv_general_dilated(
        x, weight, (1, 1), [(pad, pad), (pad, pad)], dimension_numbers=_DIMS
    )


class Linear(nn.Module):
    """EDM ``Linear``: ``y = x @ weight + bias`` with ``weight`` of shape ``(in, out)``."""

    features: int
    bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", _weight_init, (jnp.shape(x)[-1], self.features), jnp.float32)
        y = jnp.asarray(x, w.dtype) @ w
        if self.bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y


class Conv2d(nn.Module):
    """EDM ``Conv2d`` on NHWC images (see the module docstring for the resampling math).

    Attributes:
      out_channels: output channels (must equal the input channels when ``kernel = 0``).
      kernel: 0 (pure resample, no parameters), 1 or 3.
      bias: whether a ``bias`` leaf exists (only when ``kernel > 0``).
      up, down: 2x upsampling / downsampling (at most one).
      resample_filter: the 1-D taps ``f1``.
      fused_resample: for ``down``, apply the weight conv before the filter (NCSN++
        ``aux_residual``). Fused up is not used by any published model and is rejected.
    """

    out_channels: int
    kernel: int
    bias: bool = True
    up: bool = False
    down: bool = False
    resample_filter: tuple[float, ...] = (1, 1)
    fused_resample: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.up and self.down:
            raise ValueError(f"Conv2d '{self.name}': up and down are mutually exclusive")
        if self.fused_resample and self.up:
            raise ValueError(
                f"Conv2d '{self.name}': fused_resample with up is not supported (no published "
                "EDM model uses it)"
            )
        x = float32_unless_low(x)
        cin = x.shape[-1]
        if self.kernel == 0 and self.out_channels != cin:
            raise ValueError(
                f"Conv2d '{self.name}': kernel 0 (pure resample) needs out_channels == in "
                f"channels, got {self.out_channels} and {cin}"
            )
        weight = None
        if self.kernel:
            shape = (self.kernel, self.kernel, cin, self.out_channels)
            weight = self.param("weight", _weight_init, shape, jnp.float32)
            x = x.astype(weight.dtype)
        f = resample_filter_2d(self.resample_filter)
        w_pad, f_pad = self.kernel // 2, (f.shape[0] - 1) // 2
        if self.fused_resample and self.down and weight is not None:
            x = _depthwise(_conv(x, weight, w_pad + f_pad), f, stride=2, pad=0, dilation=1)
        else:
            if self.up:
                x = _depthwise(x, 4 * f, stride=1, pad=f.shape[0] - 1 - f_pad, dilation=2)
            if self.down:
                x = _depthwise(x, f, stride=2, pad=f_pad, dilation=1)
            if weight is not None:
                x = _conv(x, weight, w_pad)
        if self.kernel and self.bias:
            x = x + self.param("bias", nn.initializers.zeros, (self.out_channels,), jnp.float32)
        return x


class GroupNorm(nn.Module):
    """EDM ``GroupNorm``: ``G = min(32, C // 4)`` groups, ``(x - mean) / sqrt(var + eps)``.

    Mean and biased variance are taken per sample and group over ``(H, W, C / G)``; then the
    per-channel ``weight`` (init 1) and ``bias`` (init 0) are applied.
    """

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = jnp.result_type(x)
        x = jnp.asarray(x, jnp.float32)
        c = x.shape[-1]
        groups = min(32, c // 4)
        xg = x.reshape(*x.shape[:-1], groups, c // groups)
        axes = (1, 2, 4)
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        y = ((xg - mean) * lax.rsqrt(var + jnp.float32(self.eps))).reshape(x.shape)
        weight = self.param("weight", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        out = y * at_least_float32(weight) + at_least_float32(bias)
        return out.astype(dtype) if is_low_precision(dtype) else out


class PositionalEmbedding(nn.Module):
    """EDM ``PositionalEmbedding``: ``(N,)`` noise labels to ``(N, num_channels)``.

    ``out = concat[cos(c f), sin(c f)]``, ``f_i = (1 / max_positions) ** (i / (n/2 - e))``
    for ``i < n/2`` and ``e = 1`` if ``endpoint`` else 0, in float32 like EDM.
    """

    num_channels: int
    max_positions: int = 10000
    endpoint: bool = False

    def __call__(self, c: jax.Array) -> jax.Array:
        half = self.num_channels // 2
        exponent = np.arange(half, dtype=np.float32) / np.float32(half - int(self.endpoint))
        freqs = np.float32(1.0 / self.max_positions) ** exponent
        phase = jnp.asarray(c, jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
        return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=1)


class FourierEmbedding(nn.Module):
    """EDM ``FourierEmbedding``: ``concat[cos(c 2 pi f), sin(c 2 pi f)]``.

    The ``(num_channels / 2,)`` frequencies ``freqs`` are random at construction
    (``N(0, scale^2)``) and must be loaded from the checkpoint; they are a parameter leaf.
    """

    num_channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, c: jax.Array) -> jax.Array:
        freqs = self.param(
            "freqs",
            lambda key, shape: self.scale * jax.random.normal(key, shape, jnp.float32),
            (self.num_channels // 2,),
        )
        phase = jnp.asarray(c, jnp.float32)[:, None] * (jnp.float32(2 * np.pi) * freqs)[None, :]
        return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=1)


def multi_head_attention(qkv: jax.Array, num_heads: int) -> jax.Array:
    """EDM's self-attention over the pixels of ``qkv`` ``(B, H, W, 3 C)`` -> ``(B, H, W, C)``.

    Channel ``head * (3 C / heads) + c * 3 + j`` of ``qkv`` is channel ``c`` of head ``head``
    of q (``j = 0``), k (1) or v (2): interleaved with stride 3. With ``d = C / heads`` and
    pixels flattened row-major, ``w[i, j] = softmax_j(sum_c q[c, i] k[c, j] / sqrt(d))`` and
    ``a[c, i] = sum_j w[i, j] v[c, j]``; output channel ``head * d + c``.
    """
    b, h, w, c3 = qkv.shape
    d = c3 // (3 * num_heads)
    t = qkv.reshape(b, h * w, num_heads, d, 3)
    q, k, v = t[..., 0], t[..., 1], t[..., 2]
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k / jnp.float32(math.sqrt(d)))
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    a = jnp.einsum("bhqk,bkhc->bqhc", weights, v)
    return a.reshape(b, h, w, num_heads * d)


class UNetBlock(nn.Module):
    """EDM ``UNetBlock`` (NHWC) with submodules ``norm0 conv0 affine norm1 conv1 [skip]
    [norm2 qkv proj]``.

    Forward (``p = affine(emb)`` broadcast over H and W)::

        h = conv0(silu(norm0(x)))
        h = silu(norm1(h + p))                                  # adaptive_scale False (SongUNet)
        h = silu(shift + norm1(h) * (scale + 1))                # True (ADM), p = [scale, shift]
        h = (conv1(h) + (skip(x) if skip else x)) * skip_scale
        h = (proj(attention(qkv(norm2(h)))) + h) * skip_scale   # if num_heads > 0

    ``skip`` exists iff ``in != out`` or ``up`` or ``down``; its kernel is 1 if
    ``resample_proj`` or ``in != out``, else 0 (a parameter-free resample).

    Attributes:
      out_channels: the block width (input and embedding widths are read from the inputs).
      up, down: resampling in ``conv0`` and ``skip``.
      num_heads: attention heads (0: no attention).
      skip_scale: ``sqrt(1/2)`` in SongUNet, 1 in ADM.
      eps: GroupNorm epsilon (1e-6 SongUNet, 1e-5 ADM).
      resample_filter: 1-D taps of the resampling filter.
      resample_proj: SongUNet's always-1x1 skip.
      adaptive_scale: ADM's scale-and-shift embedding.
    """

    out_channels: int
    up: bool = False
    down: bool = False
    num_heads: int = 0
    skip_scale: float = 1.0
    eps: float = 1e-5
    resample_filter: tuple[float, ...] = (1, 1)
    resample_proj: bool = False
    adaptive_scale: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        x = float32_unless_low(x)
        cin, cout = x.shape[-1], self.out_channels
        resample = dict(up=self.up, down=self.down, resample_filter=self.resample_filter)
        h = Conv2d(cout, 3, name="conv0", **resample)(nn.silu(GroupNorm(self.eps, name="norm0")(x)))
        p = Linear(cout * (2 if self.adaptive_scale else 1), name="affine")(emb)[:, None, None, :]
        norm1 = GroupNorm(self.eps, name="norm1")
        if self.adaptive_scale:
            scale, shift = p[..., :cout], p[..., cout:]
            h = nn.silu(shift + norm1(h) * (scale + 1))
        else:
            h = nn.silu(norm1(h + p))
        h = Conv2d(cout, 3, name="conv1")(h)
        if cin != cout or self.up or self.down:
            kernel = 1 if self.resample_proj or cin != cout else 0
            x = Conv2d(cout, kernel, name="skip", **resample)(x)
        h = (h + x) * float(self.skip_scale)
        if self.num_heads:
            qkv = Conv2d(3 * cout, 1, name="qkv")(GroupNorm(self.eps, name="norm2")(h))
            a = multi_head_attention(qkv, self.num_heads)
            h = (Conv2d(cout, 1, name="proj")(a) + h) * float(self.skip_scale)
        return h
