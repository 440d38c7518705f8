"""Residual blocks of the score_sde networks.

All three blocks share the DDPM layout

    h = conv3x3(act(GroupNorm(x)))                       # Conv_0
    h = h + Dense(act(temb))[:, None, None, :]           # Dense_0 (if temb is given)
    h = conv3x3(dropout(act(GroupNorm(h))), scale)       # Conv_1 (near-zero init)
    out = skip(x) + h            (or (skip(x) + h) / sqrt(2) with skip_rescale)

and differ in how the skip connection changes the number of channels and in whether the
block also resamples (BigGAN style). ``temb`` is the time/noise-level embedding, shape
``(B, 4 * nf)``; ``train`` turns dropout on (it then needs a ``'dropout'`` RNG).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax

from deis_jax.models.score_sde.layers import NIN, conv1x1, conv3x3, dense, group_norm
from deis_jax.models.score_sde.resampling import (
    downsample_2d,
    naive_downsample_2d,
    naive_upsample_2d,
    upsample_2d,
)

Act = Callable[[jax.Array], jax.Array]


def _residual_branch(
    x: jax.Array,
    temb: jax.Array | None,
    out_ch: int,
    act: Act,
    dropout: float,
    init_scale: float,
    train: bool,
    resample: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """The shared norm-act-conv-(temb)-norm-act-dropout-conv branch (called in a parent)."""
    h = act(group_norm(x))
    if resample is not None:
        h = resample(h)
    h = conv3x3(h, out_ch)
    if temb is not None:
        h = h + dense(act(temb), out_ch)[:, None, None, :]
    h = act(group_norm(h))
    h = nn.Dropout(dropout)(h, deterministic=not train)
    return conv3x3(h, out_ch, init_scale=init_scale)


class ResnetBlockDDPM(nn.Module):
    """Residual block of the original DDPM network.

    Channel changes on the skip path use ``NIN_0`` (or a 3x3 ``Conv_2`` with
    ``conv_shortcut``); no skip rescaling; the last conv starts at (almost) zero.
    """

    act: Act
    out_ch: int | None = None
    conv_shortcut: bool = False
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, train: bool = False):
        c = x.shape[-1]
        out_ch = self.out_ch if self.out_ch else c
        h = _residual_branch(x, temb, out_ch, self.act, self.dropout, 0.0, train)
        if c != out_ch:
            x = conv3x3(x, out_ch) if self.conv_shortcut else NIN(out_ch)(x)
        return x + h


class ResnetBlockDDPMpp(nn.Module):
    """DDPM++ residual block: the DDPM block with ``init_scale`` and ``skip_rescale``."""

    act: Act
    out_ch: int | None = None
    conv_shortcut: bool = False
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, train: bool = False):
        c = x.shape[-1]
        out_ch = self.out_ch if self.out_ch else c
        h = _residual_branch(x, temb, out_ch, self.act, self.dropout, self.init_scale, train)
        if c != out_ch:
            x = conv3x3(x, out_ch) if self.conv_shortcut else NIN(out_ch)(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN-style residual block that can also resample by 2 (``up`` / ``down``).

    Resampling (nearest/box, or FIR with ``fir``) is applied to both the residual branch
    (after the first activation) and the skip path. When the block resamples or changes the
    channel count, the skip path gets a 1x1 conv ``Conv_2``.
    """

    act: Act
    up: bool = False
    down: bool = False
    out_ch: int | None = None
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0

    def _resample(self, x: jax.Array) -> jax.Array:
        if self.up:
            return upsample_2d(x, self.fir_kernel) if self.fir else naive_upsample_2d(x)
        if self.down:
            return downsample_2d(x, self.fir_kernel) if self.fir else naive_downsample_2d(x)
        return x

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, train: bool = False):
        if self.up and self.down:
            raise ValueError("a ResnetBlockBigGANpp cannot both upsample and downsample")
        c = x.shape[-1]
        out_ch = self.out_ch if self.out_ch else c
        resamples = self.up or self.down
        h = _residual_branch(
            x,
            temb,
            out_ch,
            self.act,
            self.dropout,
            self.init_scale,
            train,
            resample=self._resample if resamples else None,
        )
        x = self._resample(x)
        if c != out_ch or resamples:
            x = conv1x1(x, out_ch)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h
