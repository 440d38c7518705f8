"""EDM's U-Nets in Flax (NHWC, float32): :class:`SongUNet` (DDPM++ / NCSN++) and
:class:`DhariwalUNet` (ADM), parameter-compatible with EDM's published pickles.

Both are called as ``F.apply({'params': p}, x, c_noise, class_labels=None,
augment_labels=None)`` with ``x`` ``(B, H, W, C)``, noise labels ``c_noise`` of shape ``(B,)``
or ``(1,)`` (a ``(1,)`` label broadcasts over the batch), ``class_labels`` ``(B, L)`` or
``(1, L)`` (one-hot rows; ``None`` = an all-zero row) and ``augment_labels`` ``(B, 9)`` or
``None`` (= zeros: ``map_augment`` has no bias). The fields are EDM's constructor arguments
(lists as tuples); ``dropout`` and ``label_dropout`` are accepted but the networks are
inference-only (``train`` must be False). The parameter path of every leaf is the PyTorch
``state_dict`` name after ``model.`` split on ``'.'`` (see :mod:`deis_jax.models.edm.params`).

Embedding (``N`` noise channels, ``E = channel_mult_emb * model_channels``):

* SongUNet: ``e = swap_halves(map_noise(c_noise))`` (positional with endpoint, or Fourier),
  ``e += map_label(labels * sqrt(label_dim))``, ``e += map_augment(aug)``, then
  ``e = silu(map_layer1(silu(map_layer0(e))))``; ``N = channel_mult_noise * model_channels``.
* ADM: ``e = silu(map_layer0(map_noise(c_noise) + map_augment(aug)))``,
  ``e = silu(map_layer1(e) + map_label(labels))``; ``N = model_channels``.

The encoder/decoder layout is :func:`deis_jax.models.edm.topology.unet_plan`. Both networks
sow the output of their last encoder block (lowest resolution: ``enc['8x8_block3']`` of the
CIFAR-10 SongUNet, ``enc['8x8_block2']`` of the ImageNet-64 ADM -- the activation the AMED
authors' predictor reads) as ``intermediates['bottleneck']``, so
:func:`deis_jax.models.features.apply_with_features` works on them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from deis_jax.models.edm.layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
)
from deis_jax.models.edm.topology import ENCODER_TYPES, Entry, UNetPlan, unet_plan

__all__ = ["EMBEDDING_TYPES", "DECODER_TYPES", "BlockStyle", "DhariwalUNet", "SongUNet"]

EMBEDDING_TYPES = ("positional", "fourier")
DECODER_TYPES = ("standard",)


@dataclasses.dataclass(frozen=True)
class BlockStyle:
    """The :class:`UNetBlock` settings a network shares across its blocks."""

    skip_scale: float
    eps: float
    resample_filter: tuple[float, ...]
    resample_proj: bool
    adaptive_scale: bool

    def block(self, entry: Entry) -> UNetBlock:
        """The block of a plan entry (created in the calling module)."""
        return UNetBlock(
            entry.out_channels,
            up=entry.up,
            down=entry.down,
            num_heads=entry.num_heads,
            name=entry.name,
            **dataclasses.asdict(self),
        )


ADM_STYLE = BlockStyle(1.0, 1e-5, (1, 1), resample_proj=False, adaptive_scale=True)


class _Encoder(nn.Module):
    """The ``enc`` entries; returns ``(x, skips)``."""

    entries: tuple[Entry, ...]
    style: BlockStyle

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips, aux = [], x
        for e in self.entries:
            if e.kind == "aux_residual":
                conv = Conv2d(
                    e.out_channels,
                    3,
                    down=True,
                    resample_filter=self.style.resample_filter,
                    fused_resample=True,
                    name=e.name,
                )
                x = (x + conv(aux)) / math.sqrt(2)
                skips[-1] = aux = x
                continue
            if e.kind == "conv":
                x = Conv2d(e.out_channels, 3, name=e.name)(x)
            else:
                x = self.style.block(e)(x, emb)
            skips.append(x)
        return x, skips


class _Decoder(nn.Module):
    """The ``dec`` entries."""

    entries: tuple[Entry, ...]
    style: BlockStyle

    @nn.compact
    def __call__(self, x: jax.Array, skips: list[jax.Array], emb: jax.Array) -> jax.Array:
        skips, normed = list(skips), None
        for e in self.entries:
            if e.kind == "aux_norm":
                normed = GroupNorm(self.style.eps, name=e.name)(x)
            elif e.kind == "aux_conv":
                x = Conv2d(e.out_channels, 3, name=e.name)(nn.silu(normed))
            else:
                if e.concat:
                    x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = self.style.block(e)(x, emb)
        return x


def _prepare(net, x: jax.Array, noise_labels: jax.Array, train: bool):
    if train:
        raise ValueError(
            f"{type(net).__name__} is an inference-only port of EDM's network: train must be "
            "False (dropout and label dropout are not implemented)"
        )
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != net.in_channels:
        raise ValueError(
            f"{type(net).__name__} expects NHWC images with {net.in_channels} channels, got "
            f"shape {x.shape}"
        )
    return x, jnp.asarray(noise_labels, jnp.float32).reshape(-1)


def _rows(values: jax.Array | None, dim: int) -> jax.Array:
    """``values`` as float32 ``(-1, dim)`` rows; ``None`` is one zero row (it broadcasts)."""
    if values is None:
        return jnp.zeros((1, dim), jnp.float32)
    return jnp.asarray(values, jnp.float32).reshape(-1, dim)


class _UNet(nn.Module):
    """Fields and encoder-decoder pass shared by :class:`SongUNet` and :class:`DhariwalUNet`."""

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.10
    label_dropout: float = 0.0

    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}
    _VARIANT: ClassVar[str] = ""  # unet_plan's variant: 'song' or 'adm'

    def _plan_options(self) -> dict:
        """Variant-specific arguments of ``unet_plan``."""
        return {}

    @property
    def plan(self) -> UNetPlan:
        return unet_plan(
            self._VARIANT,
            img_resolution=self.img_resolution,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            model_channels=self.model_channels,
            channel_mult=self.channel_mult,
            num_blocks=self.num_blocks,
            attn_resolutions=self.attn_resolutions,
            **self._plan_options(),
        )

    def __post_init__(self):
        """Validate the fields at construction: the choices, then the layout."""
        super().__post_init__()
        for field, allowed in self._CHOICES.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(
                    f"{type(self).__name__} {field} must be one of {list(allowed)}, got {value!r}"
                )
        self.plan  # noqa: B018 -- building the plan validates the layout fields

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        noise_labels: jax.Array,
        class_labels: jax.Array | None = None,
        augment_labels: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """``F(x, c_noise, class_labels, augment_labels)`` for NHWC ``x``: the subclass's
        embedding, the encoder and decoder of its ``plan`` and ``style`` (the last encoder
        block's output sown as the bottleneck), then its output head."""
        x, noise_labels = _prepare(self, x, noise_labels, train)
        emb = self._embedding(noise_labels, class_labels, augment_labels)
        plan, style = self.plan, self.style
        x, skips = _Encoder(plan.enc, style, name="enc")(x, emb)
        self.sow("intermediates", "bottleneck", x)
        return self._output(_Decoder(plan.dec, style, name="dec")(x, skips, emb))

    def _embedding(self, noise_labels, class_labels, augment_labels) -> jax.Array:
        """The embedding every block receives (the mapping network)."""
        raise NotImplementedError

    def _output(self, x: jax.Array) -> jax.Array:
        """The output head after the decoder (identity: SongUNet's decoder ends in it)."""
        return x


class SongUNet(_UNet):
    """EDM's SongUNet: DDPM++ (``embedding_type='positional'``, ``encoder_type='standard'``,
    ``channel_mult_noise=1``, ``resample_filter=(1, 1)``) and NCSN++ (``'fourier'``,
    ``'residual'``, 2, ``(1, 3, 3, 1)``). ``decoder_type`` must be ``'standard'`` (EDM's
    ``'skip'`` encoder/decoder are used by no published model and are not ported)."""

    embedding_type: str = "positional"
    channel_mult_noise: int = 1
    encoder_type: str = "standard"
    decoder_type: str = "standard"
    resample_filter: tuple[float, ...] = (1, 1)

    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "embedding_type": EMBEDDING_TYPES,
        "encoder_type": ENCODER_TYPES,
        "decoder_type": DECODER_TYPES,
    }

    _VARIANT: ClassVar[str] = "song"

    def _plan_options(self) -> dict:
        return {"encoder_type": self.encoder_type}

    @property
    def style(self) -> BlockStyle:
        return BlockStyle(
            math.sqrt(0.5),
            1e-6,
            tuple(self.resample_filter),
            resample_proj=True,
            adaptive_scale=False,
        )

    def _embedding(self, noise_labels, class_labels, augment_labels) -> jax.Array:
        noise_channels = self.model_channels * self.channel_mult_noise
        emb_channels = self.model_channels * self.channel_mult_emb
        if self.embedding_type == "positional":
            emb = PositionalEmbedding(noise_channels, endpoint=True, name="map_noise")(noise_labels)
        else:
            emb = FourierEmbedding(noise_channels, name="map_noise")(noise_labels)
        half = noise_channels // 2
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=1)  # [sin, cos]
        if self.label_dim:
            labels = _rows(class_labels, self.label_dim)
            scale = jnp.float32(math.sqrt(self.label_dim))
            emb = emb + Linear(noise_channels, name="map_label")(labels * scale)
        if self.augment_dim:
            aug = _rows(augment_labels, self.augment_dim)
            emb = emb + Linear(noise_channels, bias=False, name="map_augment")(aug)
        emb = nn.silu(Linear(emb_channels, name="map_layer0")(emb))
        return nn.silu(Linear(emb_channels, name="map_layer1")(emb))


class DhariwalUNet(_UNet):
    """EDM's DhariwalUNet (ADM): positional embedding without endpoint, adaptive-scale
    blocks, ``out_channels // 64`` attention heads, ``[1, 1]`` resampling, and the output head
    ``out_conv(silu(out_norm(x)))``. EDM's defaults: 192 channels, ``(1, 2, 3, 4)``, 3 blocks,
    attention at ``(32, 16, 8)``."""

    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (32, 16, 8)

    _VARIANT: ClassVar[str] = "adm"

    @property
    def style(self) -> BlockStyle:
        return ADM_STYLE

    def _embedding(self, noise_labels, class_labels, augment_labels) -> jax.Array:
        mc = self.model_channels
        emb_channels = mc * self.channel_mult_emb
        emb = PositionalEmbedding(mc, endpoint=False, name="map_noise")(noise_labels)
        if self.augment_dim:
            aug = _rows(augment_labels, self.augment_dim)
            emb = emb + Linear(mc, bias=False, name="map_augment")(aug)
        emb = nn.silu(Linear(emb_channels, name="map_layer0")(emb))
        emb = Linear(emb_channels, name="map_layer1")(emb)
        if self.label_dim:
            labels = _rows(class_labels, self.label_dim)
            emb = emb + Linear(emb_channels, bias=False, name="map_label")(labels)
        return nn.silu(emb)

    def _output(self, x: jax.Array) -> jax.Array:
        x = nn.silu(GroupNorm(self.style.eps, name="out_norm")(x))
        return Conv2d(self.out_channels, 3, name="out_conv")(x)
