"""The layout of EDM's U-Nets (SongUNet = DDPM++ / NCSN++, DhariwalUNet = ADM) as plain data.

:func:`unet_plan` lists the entries of the encoder (``enc``) and decoder (``dec``) in forward
execution order, each with its name (``{r}x{r}_conv``, ``_down``, ``_aux_residual``,
``_block{i}``, ``_in0``, ``_in1``, ``_up``, ``_aux_norm``, ``_aux_conv``), channels,
resampling and attention heads. The Flax networks (:mod:`deis_jax.models.edm.unets`) are built
from it, and the checkpoint converter reads from it which ``resample_filter`` buffers a
state dict must hold (:func:`resample_buffer_names`).

With ``mc = model_channels``, levels ``l = 0..L-1`` at resolution ``r = R >> l``:

* encoder: level 0 starts with ``_conv`` (3x3, ``in -> mc`` for SongUNet,
  ``in -> mc * mult[0]`` for ADM); later levels start with ``_down`` (a block with down), in
  NCSN++ (``encoder_type='residual'``) followed by ``_aux_residual`` (fused-down 3x3 conv of
  the auxiliary image path); then ``num_blocks`` blocks to ``mc * mult[l]``. Every entry but
  ``_aux_residual`` pushes its output on the skip stack (which ``_aux_residual`` overwrites).
* decoder, from the lowest level up: ``_in0`` (attention) and ``_in1`` at the lowest level,
  ``_up`` elsewhere; then ``num_blocks + 1`` blocks, each concatenating ``[x, skips.pop()]``;
  SongUNet ends level 0 with ``_aux_norm`` and ``_aux_conv`` (``-> out_channels``).
* attention heads: SongUNet 1, ADM ``out_channels // 64`` (0 means no attention). Encoder
  blocks attend at ``r in attn_resolutions``; decoder blocks too, but in SongUNet only the
  last block of a level.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = [
    "ENCODER_TYPES",
    "UNET_VARIANTS",
    "Entry",
    "UNetPlan",
    "resample_buffer_names",
    "unet_plan",
]

UNET_VARIANTS = ("song", "adm")
ENCODER_TYPES = ("standard", "residual")
ADM_CHANNELS_PER_HEAD = 64


@dataclasses.dataclass(frozen=True)
class Entry:
    """One encoder/decoder entry.

    ``kind`` is ``'conv'`` (3x3 conv), ``'block'`` (UNetBlock), ``'aux_residual'`` (fused-down
    3x3 conv on the auxiliary path), ``'aux_norm'`` (GroupNorm) or ``'aux_conv'`` (3x3 conv).
    ``concat``: the entry first concatenates ``[x, skips.pop()]`` (decoder blocks);
    ``in_channels`` counts the concatenated input.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    up: bool = False
    down: bool = False
    num_heads: int = 0
    concat: bool = False


@dataclasses.dataclass(frozen=True)
class UNetPlan:
    """Encoder and decoder entries in execution order."""

    enc: tuple[Entry, ...]
    dec: tuple[Entry, ...]


def _check_choice(field: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")


def unet_plan(
    variant: str,
    *,
    img_resolution: int,
    in_channels: int,
    out_channels: int,
    model_channels: int,
    channel_mult: Sequence[int],
    num_blocks: int,
    attn_resolutions: Sequence[int],
    encoder_type: str = "standard",
) -> UNetPlan:
    """The entries of a SongUNet (``variant='song'``) or DhariwalUNet (``'adm'``).

    Raises:
      ValueError: an unknown ``variant`` / ``encoder_type`` (ADM has only ``'standard'``), an
        empty ``channel_mult`` or an ``img_resolution`` not divisible by ``2**(L-1)``.
    """
    _check_choice("variant", variant, UNET_VARIANTS)
    _check_choice(
        "encoder_type", encoder_type, ENCODER_TYPES if variant == "song" else ENCODER_TYPES[:1]
    )
    levels = len(channel_mult)
    if levels == 0:
        raise ValueError("channel_mult must list at least one level")
    if img_resolution % (1 << (levels - 1)):
        raise ValueError(
            f"img_resolution {img_resolution} must be divisible by 2**(len(channel_mult) - 1) "
            f"= {1 << (levels - 1)}"
        )
    song = variant == "song"

    def heads(attention: bool, channels: int) -> int:
        if not attention:
            return 0
        return 1 if song else channels // ADM_CHANNELS_PER_HEAD

    enc: list[Entry] = []
    cout = caux = in_channels
    for level, mult in enumerate(channel_mult):
        r = img_resolution >> level
        prefix = f"{r}x{r}"
        if level == 0:
            cin, cout = cout, model_channels * (1 if song else mult)
            enc.append(Entry(f"{prefix}_conv", "conv", cin, cout))
        else:
            enc.append(Entry(f"{prefix}_down", "block", cout, cout, down=True))
            if encoder_type == "residual":
                enc.append(Entry(f"{prefix}_aux_residual", "aux_residual", caux, cout, down=True))
                caux = cout
        for idx in range(num_blocks):
            cin, cout = cout, model_channels * mult
            attn = heads(r in attn_resolutions, cout)
            enc.append(Entry(f"{prefix}_block{idx}", "block", cin, cout, num_heads=attn))

    skips = [e.out_channels for e in enc if e.kind != "aux_residual"]
    dec: list[Entry] = []
    for level, mult in reversed(list(enumerate(channel_mult))):
        r = img_resolution >> level
        prefix = f"{r}x{r}"
        if level == levels - 1:
            dec.append(Entry(f"{prefix}_in0", "block", cout, cout, num_heads=heads(True, cout)))
            dec.append(Entry(f"{prefix}_in1", "block", cout, cout))
        else:
            dec.append(Entry(f"{prefix}_up", "block", cout, cout, up=True))
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            attn = heads(r in attn_resolutions and (idx == num_blocks or not song), cout)
            dec.append(
                Entry(f"{prefix}_block{idx}", "block", cin, cout, num_heads=attn, concat=True)
            )
        if song and level == 0:
            dec.append(Entry(f"{prefix}_aux_norm", "aux_norm", cout, cout))
            dec.append(Entry(f"{prefix}_aux_conv", "aux_conv", cout, out_channels))
    return UNetPlan(enc=tuple(enc), dec=tuple(dec))


def resample_buffer_names(plan: UNetPlan) -> list[str]:
    """State-dict names (relative to the U-Net) of the ``resample_filter`` buffers of ``plan``.

    Every resampling conv has one: ``conv0`` and ``skip`` of each up/down block (also a
    parameter-free kernel-0 skip) and each ``_aux_residual``.
    """
    names = []
    for part, entries in (("enc", plan.enc), ("dec", plan.dec)):
        for e in entries:
            if e.kind == "block" and (e.up or e.down):
                names += [f"{part}.{e.name}.conv0.resample_filter"]
                names += [f"{part}.{e.name}.skip.resample_filter"]
            elif e.kind == "aux_residual":
                names.append(f"{part}.{e.name}.resample_filter")
    return names
