"""NCSN++ / DDPM++ (Song et al., 2021), parameter-compatible with score_sde's ``ncsnpp`` model.

One U-Net covers both families; the published configurations differ only in options:

* **DDPM++** (VP / sub-VP): positional (sinusoidal) embedding of the label ``999 t``, BigGAN
  residual blocks with nearest/box resampling (``fir=False``), no progressive growing.
* **NCSN++** (VE): Gaussian Fourier embedding of ``log sigma``, FIR resampling with
  ``[1, 3, 3, 1]``, a progressive *input* pyramid (``progressive_input='residual'``) and
  ``scale_by_sigma`` (the output is divided by sigma, so the network returns the score).

Architecture (``L = len(ch_mult)`` resolutions, ``R = num_res_blocks``)::

    temb = Dense(act(Dense(embed(labels))))                   # Dense_0, Dense_1 (conditional)
    h = Conv_0(x)                                             # x -> 2x - 1 if not centered
    down: for each level: R x [ResBlock (+ Attn at attn_resolutions)], then a downsampling
          ResBlock (or Downsample for resblock_type='ddpm'), optionally merged with the
          downsampled input pyramid ('input_skip': Combine, 'residual': add (/ sqrt 2))
    mid:  ResBlock, Attn, ResBlock                            # sown as 'bottleneck'
    up:   for each level: (R + 1) x ResBlock on concat(h, skip), Attn at attn_resolutions,
          optional output pyramid ('output_skip' / 'residual'), then an upsampling ResBlock
          (or Upsample)
    out = Conv(act(GroupNorm(h)))  (or the output pyramid for 'output_skip'); / sigma if
          scale_by_sigma

The order in which submodules are created below fixes their auto-generated names
(``ResnetBlockBigGANpp_k``, ``AttnBlockpp_k``, ``Conv_k``, ...) and therefore the checkpoint
format; keep it in sync with score_sde.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.common.precision import at_least_float32, to_compute
from deis_jax.models.score_sde.blocks import ResnetBlockBigGANpp, ResnetBlockDDPMpp
from deis_jax.models.score_sde.layers import (
    AttnBlockpp,
    Combine,
    GaussianFourierProjection,
    conv3x3,
    dense,
    get_act,
    group_norm,
    timestep_embedding,
)
from deis_jax.models.score_sde.resampling import Downsample, Upsample

RESBLOCK_TYPES = ("ddpm", "biggan")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINE = ("sum", "cat")
EMBEDDING_TYPES = ("fourier", "positional")


def discrete_sigmas(sigma_min: float, sigma_max: float, num_scales: int) -> np.ndarray:
    """score_sde's ``get_sigmas``: ``num_scales`` geometric noise levels, largest first."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales)).astype(np.float32)


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ score network (score_sde ``model.name = 'ncsnpp'``).

    Call as ``model.apply({'params': params}, x, labels, train=False)``:

    * ``x``: images ``(B, H, W, C)``, NHWC, in [-1, 1] if ``centered`` else in [0, 1] (the
      network maps them to [-1, 1] itself).
    * ``labels``: the raw conditioning value, shape ``(B,)`` (a scalar is broadcast):
      ``999 * t`` for continuous VP / sub-VP models (positional embedding), ``sigma(t)`` for
      continuous VE models (Fourier embedding of ``log sigma``), the integer step for discrete
      models.
    * ``train``: enables dropout (needs ``rngs={'dropout': key}``).

    Returns an array shaped like ``x``:

    * VP / sub-VP (``scale_by_sigma=False``): a noise prediction, ``eps``; the score is
      ``-output / sigma_t``.
    * VE with ``scale_by_sigma=True``: the score itself (the network divides by sigma).

    With ``mutable=['intermediates']`` the activation after the middle block (lowest
    resolution) is also sown as ``intermediates['bottleneck']``, a 1-tuple; see
    :func:`deis_jax.models.features.apply_with_features`.

    Fields mirror score_sde's ``config.model`` (plus ``centered`` from ``config.data``);
    build instances from a config with :func:`deis_jax.models.score_sde.get_model`.
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    conditional: bool = True
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "none"
    progressive_combine: str = "sum"
    embedding_type: str = "positional"
    init_scale: float = 0.0
    fourier_scale: float = 16.0
    scale_by_sigma: bool = False
    nonlinearity: str = "swish"
    centered: bool = True
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
    #: compute dtype (``deis_jax.common.precision``): pass its params through
    #: ``cast_params(params, dtype)``; the output is float32 whatever it is
    dtype: str = "float32"

    # ----------------------------------------------------------------------------- helpers
    def _resblock(self, **kwargs) -> nn.Module:
        act = get_act(self.nonlinearity)
        if self.resblock_type == "ddpm":
            kwargs.pop("up", None)
            kwargs.pop("down", None)
            return ResnetBlockDDPMpp(
                act=act,
                dropout=self.dropout,
                init_scale=self.init_scale,
                skip_rescale=self.skip_rescale,
                **kwargs,
            )
        if self.resblock_type == "biggan":
            return ResnetBlockBigGANpp(
                act=act,
                dropout=self.dropout,
                fir=self.fir,
                fir_kernel=self.fir_kernel,
                init_scale=self.init_scale,
                skip_rescale=self.skip_rescale,
                **kwargs,
            )
        raise ValueError(
            f"resblock_type must be one of {RESBLOCK_TYPES}, got {self.resblock_type!r}"
        )

    def _attn(self) -> nn.Module:
        return AttnBlockpp(init_scale=self.init_scale, skip_rescale=self.skip_rescale)

    def _merge(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return (a + b) / math.sqrt(2.0) if self.skip_rescale else a + b

    def _embed(self, labels: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Time / noise-level embedding and the sigmas used by ``scale_by_sigma``."""
        if self.embedding_type == "fourier":
            emb = GaussianFourierProjection(embedding_size=self.nf, scale=self.fourier_scale)(
                jnp.log(labels)
            )
            return emb, labels
        if self.embedding_type == "positional":
            sigmas = None
            if self.scale_by_sigma:
                table = jnp.asarray(
                    discrete_sigmas(self.sigma_min, self.sigma_max, self.num_scales)
                )
                sigmas = table[labels.astype(jnp.int32)]
            return timestep_embedding(labels, self.nf), sigmas
        raise ValueError(
            f"embedding_type must be one of {EMBEDDING_TYPES}, got {self.embedding_type!r}"
        )

    # ------------------------------------------------------------------------------ model
    @nn.compact
    def __call__(self, x: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
        act = get_act(self.nonlinearity)
        num_resolutions = len(self.ch_mult)
        labels = jnp.broadcast_to(jnp.asarray(labels, jnp.float32), (x.shape[0],))
        out_channels = x.shape[-1]

        temb, used_sigmas = self._embed(labels)
        if self.conditional:
            temb = dense(to_compute(temb, self.dtype), self.nf * 4)
            temb = dense(act(temb), self.nf * 4)
        else:
            temb = None

        if not self.centered:
            x = 2.0 * x - 1.0
        x = to_compute(x, self.dtype)

        # ---------------------------------------------------------------- downsampling
        input_pyramid = x if self.progressive_input != "none" else None
        hs = [conv3x3(x, self.nf)]
        for i_level in range(num_resolutions):
            for _ in range(self.num_res_blocks):
                h = self._resblock(out_ch=self.nf * self.ch_mult[i_level])(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = self._attn()(h)
                hs.append(h)

            if i_level != num_resolutions - 1:
                if self.resblock_type == "ddpm":
                    h = Downsample(
                        with_conv=self.resamp_with_conv, fir=self.fir, fir_kernel=self.fir_kernel
                    )(hs[-1])
                else:
                    h = self._resblock(down=True)(hs[-1], temb, train)

                if self.progressive_input == "input_skip":
                    input_pyramid = Downsample(
                        with_conv=False, fir=self.fir, fir_kernel=self.fir_kernel
                    )(input_pyramid)
                    h = Combine(method=self.progressive_combine)(input_pyramid, h)
                elif self.progressive_input == "residual":
                    input_pyramid = Downsample(
                        out_ch=h.shape[-1], with_conv=True, fir=self.fir, fir_kernel=self.fir_kernel
                    )(input_pyramid)
                    input_pyramid = self._merge(input_pyramid, h)
                    h = input_pyramid
                hs.append(h)

        # ---------------------------------------------------------------------- middle
        h = hs[-1]
        h = self._resblock()(h, temb, train)
        h = self._attn()(h)
        h = self._resblock()(h, temb, train)
        # the bottleneck activation (B, H_low, W_low, C): a no-op unless 'intermediates' is
        # mutable (see deis_jax.models.features.apply_with_features); no parameters, same outputs
        self.sow("intermediates", "bottleneck", h)

        # ------------------------------------------------------------------ upsampling
        pyramid = None
        for i_level in reversed(range(num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = self._resblock(out_ch=self.nf * self.ch_mult[i_level])(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train
                )
            if h.shape[1] in self.attn_resolutions:
                h = self._attn()(h)

            if self.progressive != "none":
                pyramid, h = self._output_pyramid(pyramid, h, act, out_channels, i_level)

            if i_level != 0:
                if self.resblock_type == "ddpm":
                    h = Upsample(
                        with_conv=self.resamp_with_conv, fir=self.fir, fir_kernel=self.fir_kernel
                    )(h)
                else:
                    h = self._resblock(up=True)(h, temb, train)

        assert not hs, "internal error: unused skip connections"

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = act(group_norm(h))
            h = conv3x3(h, out_channels, init_scale=self.init_scale)

        h = at_least_float32(h)
        if self.scale_by_sigma:
            if used_sigmas is None:
                raise ValueError("scale_by_sigma needs sigmas; use embedding_type='fourier'")
            h = h / used_sigmas.reshape((-1,) + (1,) * (h.ndim - 1)).astype(h.dtype)
        return h

    def _output_pyramid(self, pyramid, h, act, out_channels, i_level):
        """One level of the progressive output path; returns ``(pyramid, h)``."""
        top = i_level == len(self.ch_mult) - 1
        if self.progressive == "output_skip":
            if top:
                return conv3x3(act(group_norm(h)), out_channels, init_scale=self.init_scale), h
            up = Upsample(with_conv=False, fir=self.fir, fir_kernel=self.fir_kernel)(pyramid)
            return up + conv3x3(act(group_norm(h)), out_channels, init_scale=self.init_scale), h
        if self.progressive == "residual":
            if top:
                return conv3x3(act(group_norm(h)), h.shape[-1]), h
            up = Upsample(
                out_ch=h.shape[-1], with_conv=True, fir=self.fir, fir_kernel=self.fir_kernel
            )(pyramid)
            pyramid = self._merge(up, h)
            return pyramid, pyramid
        raise ValueError(f"progressive must be one of {PROGRESSIVE}, got {self.progressive!r}")
