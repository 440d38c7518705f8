"""Model configs of the published score_sde CIFAR-10 checkpoints, as ``ml_collections``.

Each config is score_sde's ``config.model`` block (same field names and values) plus three
fields score_sde keeps in ``config.data`` -- ``image_size``, ``num_channels``, ``centered`` --
and a few informational fields the model ignores:

* ``sde`` (``'vpsde'``, ``'subvpsde'``, ``'vesde'``) and ``continuous``: how the network is
  conditioned. Continuous VP / sub-VP models take ``labels = 999 t`` and return eps (score =
  ``-output / sigma_t``); continuous VE models take ``labels = sigma(t)`` and, with
  ``scale_by_sigma``, return the score.
* ``score_sde_config``: the score_sde config file the values come from.
* ``checkpoint_dir``: the folder of score_sde's Google Drive that holds the checkpoint (also
  the suggested place under ``checkpoints/``).

The values were taken from the ``model_config`` / ``data_config`` blocks recorded with the
parameter trees in ``tests/fixtures/score_sde/tree_*.json``; ``tests/test_models.py`` checks
that each config reproduces its tree exactly. ``subvp_cifar10_ddpmpp_continuous`` has no tree
of its own: score_sde uses the same model block as ``vp_cifar10_ddpmpp_continuous``.
"""

from __future__ import annotations

import ml_collections

# Fields every published CIFAR-10 model block shares.
_CIFAR10_COMMON = dict(
    nf=128,
    ch_mult=(1, 2, 2, 2),
    dropout=0.1,
    resamp_with_conv=True,
    conditional=True,
    nonlinearity="swish",
    normalization="GroupNorm",
    sigma_min=0.01,
    sigma_max=50,
    num_scales=1000,
    beta_min=0.1,
    beta_max=20.0,
    ema_rate=0.9999,
    image_size=32,
    num_channels=3,
    centered=True,
    continuous=True,
)

_DDPMPP_CIFAR10 = dict(
    _CIFAR10_COMMON,
    name="ncsnpp",
    num_res_blocks=4,
    attn_resolutions=(16,),
    fir=False,
    fir_kernel=(1, 3, 3, 1),
    skip_rescale=True,
    resblock_type="biggan",
    progressive="none",
    progressive_input="none",
    progressive_combine="sum",
    attention_type="ddpm",
    embedding_type="positional",
    init_scale=0.0,
    fourier_scale=16,
    conv_size=3,
    scale_by_sigma=False,
)

_NCSNPP_CIFAR10 = dict(
    _DDPMPP_CIFAR10,
    fir=True,
    progressive_input="residual",
    embedding_type="fourier",
    scale_by_sigma=True,
    ema_rate=0.999,
    centered=False,
)

_DDPM_CIFAR10 = dict(
    _CIFAR10_COMMON,
    name="ddpm",
    num_res_blocks=2,
    attn_resolutions=(16,),
    embedding_type="fourier",  # recorded by score_sde, ignored by the ddpm network
    scale_by_sigma=False,
)

_KNOWN: dict[str, dict] = {
    "vp_cifar10_ddpmpp_continuous": dict(
        _DDPMPP_CIFAR10,
        sde="vpsde",
        score_sde_config="configs/vp/cifar10_ddpmpp_continuous.py",
        checkpoint_dir="vp/cifar10_ddpmpp_continuous",
    ),
    "vp_cifar10_ddpmpp_deep_continuous": dict(
        _DDPMPP_CIFAR10,
        num_res_blocks=8,
        sde="vpsde",
        score_sde_config="configs/vp/cifar10_ddpmpp_deep_continuous.py",
        checkpoint_dir="vp/cifar10_ddpmpp_deep_continuous",
    ),
    "subvp_cifar10_ddpmpp_continuous": dict(
        _DDPMPP_CIFAR10,
        sde="subvpsde",
        score_sde_config="configs/subvp/cifar10_ddpmpp_continuous.py",
        checkpoint_dir="subvp/cifar10_ddpmpp_continuous",
    ),
    "subvp_cifar10_ddpmpp_deep_continuous": dict(
        _DDPMPP_CIFAR10,
        num_res_blocks=8,
        sde="subvpsde",
        score_sde_config="configs/subvp/cifar10_ddpmpp_deep_continuous.py",
        checkpoint_dir="subvp/cifar10_ddpmpp_deep_continuous",
    ),
    "ve_cifar10_ncsnpp_continuous": dict(
        _NCSNPP_CIFAR10,
        sde="vesde",
        score_sde_config="configs/ve/cifar10_ncsnpp_continuous.py",
        checkpoint_dir="ve/cifar10_ncsnpp_continuous",
    ),
    "vp_ddpm_cifar10_continuous": dict(
        _DDPM_CIFAR10,
        sde="vpsde",
        score_sde_config="configs/vp/ddpm/cifar10_continuous.py",
        checkpoint_dir="vp/cifar10_ddpm_continuous",
    ),
}

KNOWN_MODEL_CONFIGS: tuple[str, ...] = tuple(_KNOWN)


def get_model_config(name: str) -> ml_collections.ConfigDict:
    """A fresh (mutable) copy of the known model config called ``name``."""
    try:
        values = _KNOWN[name]
    except KeyError:
        raise ValueError(
            f"unknown model config {name!r}; known: {', '.join(KNOWN_MODEL_CONFIGS)}"
        ) from None
    return ml_collections.ConfigDict(dict(values))
