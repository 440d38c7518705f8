"""Up- and down-sampling by 2: nearest/box ("naive") and FIR-filtered (StyleGAN2 style).

FIR resampling (Karras et al., 2020) filters with a separable kernel built from a 1-D tap
vector ``k`` (NCSN++ uses ``[1, 3, 3, 1]``): ``K = outer(k, k) / sum(outer(k, k))``.

The primitive is ``upfirdn2d(x, K, up, down, pad)``:

1. upsample by inserting ``up - 1`` zeros after every pixel (so ``H -> H * up``);
2. zero-pad ``pad = (p0, p1)`` pixels before/after along H and W (negative values crop);
3. convolve with ``K`` (a true convolution, i.e. correlation with the flipped kernel);
4. keep every ``down``-th pixel.

On top of it:

* ``upsample_2d``   = upfirdn2d with ``up=2`` and ``K * 4`` (so a constant image stays
  constant), padding ``((p + 1) // 2 + 1, p // 2)`` with ``p = len(k) - 2``;
* ``downsample_2d`` = upfirdn2d with ``down=2``, padding ``((p + 1) // 2, p // 2)``;
* ``conv_downsample_2d`` (fused "conv then FIR-downsample"): FIR-filter with padding
  ``((p + 1) // 2, p // 2)``, ``p = len(k) - 2 + (kw - 1)``, then a VALID stride-2 conv;
* ``upsample_conv_2d`` (fused "FIR-upsample then conv"): a stride-2 transposed convolution
  (TF ``conv2d_transpose`` semantics with the spatially flipped weight, i.e. the zero-inserted
  input correlated with the weight after ``kw - 1`` pixels of padding), followed by the FIR
  filter ``K * 4`` with padding ``((p + 1) // 2 + 1, p // 2 + 1)``, ``p = len(k) - 2 - (kw - 1)``.

All arrays are NHWC.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.models.score_sde.layers import conv3x3, default_init


def make_fir_kernel(k: Sequence[float]) -> np.ndarray:
    """2-D FIR kernel from 1-D taps (outer product), normalised to sum to 1."""
    k = np.asarray(k, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    return k / np.sum(k)


def upfirdn2d(
    x: jax.Array, kernel: np.ndarray, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> jax.Array:
    """Upsample (zero insertion), pad, FIR-filter and downsample an NHWC batch.

    Output size along H is ``(H * up + pad[0] + pad[1] - kh) // down + 1`` (same for W).
    """
    kernel = np.asarray(kernel, dtype=np.float32)
    kh, kw = kernel.shape
    c = x.shape[-1]
    p0, p1 = pad
    zero = jnp.zeros((), x.dtype)
    # Zero insertion (interior padding plus the trailing up-1 zeros) and padding in one op;
    # lax.pad accepts negative low/high padding, which crops.
    spatial = (p0, p1 + up - 1, up - 1)
    x = jax.lax.pad(x, zero, [(0, 0, 0), spatial, spatial, (0, 0, 0)])
    # True convolution = correlation with the flipped kernel; depthwise over channels.
    w = jnp.asarray(kernel[::-1, ::-1].copy(), dtype=x.dtype)
    w = jnp.tile(w[:, :, None, None], (1, 1, 1, c))
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=(down, down),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )


def upsample_2d(x: jax.Array, k: Sequence[float], factor: int = 2, gain: float = 1.0):
    """FIR upsampling by ``factor`` (no learned weights)."""
    kernel = make_fir_kernel(k) * (gain * factor**2)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: jax.Array, k: Sequence[float], factor: int = 2, gain: float = 1.0):
    """FIR downsampling by ``factor`` (no learned weights)."""
    kernel = make_fir_kernel(k) * gain
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def conv_downsample_2d(
    x: jax.Array, w: jax.Array, k: Sequence[float], factor: int = 2, gain: float = 1.0
) -> jax.Array:
    """Fused 'convolve with ``w`` (HWIO) then FIR-downsample by ``factor``'."""
    kernel = make_fir_kernel(k) * gain
    p = (kernel.shape[0] - factor) + (w.shape[1] - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return jax.lax.conv_general_dilated(
        x,
        w.astype(x.dtype),
        window_strides=(factor, factor),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def upsample_conv_2d(
    x: jax.Array, w: jax.Array, k: Sequence[float], factor: int = 2, gain: float = 1.0
) -> jax.Array:
    """Fused 'FIR-upsample by ``factor`` then convolve with ``w`` (HWIO)'."""
    kernel = make_fir_kernel(k) * (gain * factor**2)
    conv_h, conv_w = w.shape[0], w.shape[1]
    p = (kernel.shape[0] - factor) - (conv_w - 1)
    # Stride-`factor` transposed convolution: zero-insert (lhs dilation), pad by kernel-1 and
    # correlate with w. Output size (H - 1) * factor + conv_h.
    x = jax.lax.conv_general_dilated(
        x,
        w.astype(x.dtype),
        window_strides=(1, 1),
        padding=((conv_h - 1, conv_h - 1), (conv_w - 1, conv_w - 1)),
        lhs_dilation=(factor, factor),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return upfirdn2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def naive_upsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling (each pixel repeated ``factor`` x ``factor`` times)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Box downsampling: the mean of each ``factor`` x ``factor`` block."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return jnp.mean(x, axis=(2, 4))


class Conv2d(nn.Module):
    """Convolution with optional fused FIR up/down-sampling (score_sde's ``Conv2d``).

    Parameters are called ``weight`` (HWIO, ``(kernel, kernel, C_in, fmaps)``) and ``bias``.
    """

    fmaps: int
    kernel: int
    up: bool = False
    down: bool = False
    resample_kernel: tuple[int, ...] = (1, 3, 3, 1)
    use_bias: bool = True
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.up and self.down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        if self.kernel < 1 or self.kernel % 2 != 1:
            raise ValueError(f"Conv2d kernel must be odd and >= 1, got {self.kernel}")
        w = self.param(
            "weight",
            default_init(self.init_scale),
            (self.kernel, self.kernel, x.shape[-1], self.fmaps),
            jnp.float32,  # whatever jax_enable_x64 says, as nn.Conv keeps its parameters
        )
        if self.up:
            x = upsample_conv_2d(x, w, self.resample_kernel)
        elif self.down:
            x = conv_downsample_2d(x, w, self.resample_kernel)
        else:
            x = jax.lax.conv_general_dilated(
                x,
                w.astype(x.dtype),
                window_strides=(1, 1),
                padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        if self.use_bias:
            b = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
            x = x + b.reshape(1, 1, 1, -1)
        return x


class Upsample(nn.Module):
    """Upsample by 2, optionally followed by / fused with a 3x3 conv to ``out_ch`` channels.

    * ``fir=False``: nearest neighbour, then (``with_conv``) a 3x3 conv ``Conv_0``.
    * ``fir=True``: FIR upsampling, or (``with_conv``) the fused ``Conv2d_0`` up-conv.

    With ``fir=False, with_conv=True`` this is also the original DDPM ``Upsample``.
    """

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_ch = self.out_ch if self.out_ch else x.shape[-1]
        if not self.fir:
            h = naive_upsample_2d(x, 2)
            if self.with_conv:
                h = conv3x3(h, out_ch)
        elif not self.with_conv:
            h = upsample_2d(x, self.fir_kernel, factor=2)
        else:
            h = Conv2d(out_ch, kernel=3, up=True, resample_kernel=self.fir_kernel)(x)
        return h


class Downsample(nn.Module):
    """Downsample by 2, optionally with a 3x3 conv to ``out_ch`` channels.

    * ``fir=False``: a stride-2 'SAME' 3x3 conv ``Conv_0`` (``with_conv``) or 2x2 average pool.
    * ``fir=True``: FIR downsampling, or (``with_conv``) the fused ``Conv2d_0`` conv-down.

    With ``fir=False, with_conv=True`` this is also the original DDPM ``Downsample``.
    """

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_ch = self.out_ch if self.out_ch else x.shape[-1]
        if not self.fir:
            if self.with_conv:
                return conv3x3(x, out_ch, stride=2)
            return naive_downsample_2d(x, 2)
        if not self.with_conv:
            return downsample_2d(x, self.fir_kernel, factor=2)
        return Conv2d(out_ch, kernel=3, down=True, resample_kernel=self.fir_kernel)(x)
