"""The original DDPM U-Net (Ho et al., 2020), parameter-compatible with score_sde's ``ddpm``.

Architecture (``L = len(ch_mult)`` resolutions, ``R = num_res_blocks``)::

    temb = Dense(act(Dense(sinusoidal(labels))))           # Dense_0, Dense_1 (conditional)
    h = Conv_0(x)                                          # x -> 2x - 1 if not centered
    down: per level R x [ResnetBlockDDPM (+ AttnBlock)], then Downsample (stride-2 conv)
    mid:  ResnetBlockDDPM, AttnBlock, ResnetBlockDDPM      # sown as 'bottleneck'
    up:   per level (R + 1) x ResnetBlockDDPM on concat(h, skip) (+ AttnBlock), Upsample
    out = Conv(act(GroupNorm(h)))                          # GroupNorm_0, Conv_1

The time embedding is always sinusoidal (score_sde's ``ddpm`` ignores ``embedding_type``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deis_jax.common.precision import at_least_float32, to_compute
from deis_jax.models.score_sde.blocks import ResnetBlockDDPM
from deis_jax.models.score_sde.layers import (
    AttnBlock,
    conv3x3,
    dense,
    get_act,
    group_norm,
    timestep_embedding,
)
from deis_jax.models.score_sde.ncsnpp import discrete_sigmas
from deis_jax.models.score_sde.resampling import Downsample, Upsample


class DDPM(nn.Module):
    """Original DDPM score network (score_sde ``model.name = 'ddpm'``).

    Call as ``model.apply({'params': params}, x, labels, train=False)`` with NHWC ``x`` and
    ``labels`` of shape ``(B,)``: ``999 * t`` for continuous VP / sub-VP models, the integer
    step for discrete ones. Returns a noise prediction shaped like ``x`` (score =
    ``-output / sigma_t``), or, with ``scale_by_sigma`` (discrete VE), ``output / sigma``
    where ``sigma`` is looked up from the integer label. With ``mutable=['intermediates']`` the
    activation after the middle block is sown as ``intermediates['bottleneck']`` (see
    :func:`deis_jax.models.features.apply_with_features`).
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    conditional: bool = True
    scale_by_sigma: bool = False
    nonlinearity: str = "swish"
    centered: bool = True
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
    #: compute dtype (``deis_jax.common.precision``): pass its params through
    #: ``cast_params(params, dtype)``; the output is float32 whatever it is
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
        act = get_act(self.nonlinearity)
        num_resolutions = len(self.ch_mult)
        labels = jnp.broadcast_to(jnp.asarray(labels, jnp.float32), (x.shape[0],))

        def resblock(out_ch=None):
            return ResnetBlockDDPM(act=act, out_ch=out_ch, dropout=self.dropout)

        if self.conditional:
            temb = timestep_embedding(labels, self.nf)
            temb = dense(to_compute(temb, self.dtype), self.nf * 4)
            temb = dense(act(temb), self.nf * 4)
        else:
            temb = None

        h = to_compute(x if self.centered else 2.0 * x - 1.0, self.dtype)
        hs = [conv3x3(h, self.nf)]
        for i_level in range(num_resolutions):
            for _ in range(self.num_res_blocks):
                h = resblock(self.nf * self.ch_mult[i_level])(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock()(h)
                hs.append(h)
            if i_level != num_resolutions - 1:
                hs.append(Downsample(with_conv=self.resamp_with_conv)(hs[-1]))

        h = hs[-1]
        h = resblock()(h, temb, train)
        h = AttnBlock()(h)
        h = resblock()(h, temb, train)
        # the bottleneck activation (B, H_low, W_low, C): a no-op unless 'intermediates' is
        # mutable (see deis_jax.models.features.apply_with_features); no parameters, same outputs
        self.sow("intermediates", "bottleneck", h)

        for i_level in reversed(range(num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = resblock(self.nf * self.ch_mult[i_level])(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train
                )
            if h.shape[1] in self.attn_resolutions:
                h = AttnBlock()(h)
            if i_level != 0:
                h = Upsample(with_conv=self.resamp_with_conv)(h)
        assert not hs, "internal error: unused skip connections"

        h = act(group_norm(h))
        h = at_least_float32(conv3x3(h, x.shape[-1], init_scale=0.0))
        if self.scale_by_sigma:
            table = jnp.asarray(discrete_sigmas(self.sigma_min, self.sigma_max, self.num_scales))
            sigmas = table[labels.astype(jnp.int32)]
            h = h / sigmas.reshape((-1,) + (1,) * (h.ndim - 1)).astype(h.dtype)
        return h
