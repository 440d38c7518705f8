"""EDM's unconditional CIFAR-10 VP network (``edm-cifar10-32x32-uncond-vp``): the model of the
AMED, GITS and LD3 CIFAR-10 numbers.

    python scripts/convert_edm_checkpoint.py --edm-source ~/src/edm \
        --pickle checkpoints/edm/edm-cifar10-32x32-uncond-vp.pkl \
        --out checkpoints/converted/edm-cifar10-32x32-uncond-vp
    python main.py --config=configs/edm_cifar10_vp.py --workdir=runs/edm_cifar10 --mode=sample
    python main.py --config=configs/edm_cifar10_vp.py --workdir=runs/edm_cifar10 --mode=table \
        --config.eval.inception_weights=checkpoints/inception/pt_inception-2015-12-05.npz \
        --config.eval.amed_predictors=runs/edm_cifar10_amed/grids/cifar10

Download ``edm-cifar10-32x32-uncond-vp.pkl`` from EDM's published networks
(https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/) and EDM's FID reference statistics
``cifar10-32x32.npz`` (https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/) into
``checkpoints/``. The table (``amed_cifar10``, 50k samples per cell) should reproduce the AMED
paper's CIFAR-10 panel: iPNDM 47.98 / 13.59 / 5.08 / 3.17, DPM-Solver-2 (AFS) 155.7 / 57.30 /
10.20 / 4.98, DDIM 93.36 / 49.66 / 27.93 / 18.43 FID at NFE 3 / 5 / 7 / 9, AMED-Solver 18.49 /
7.59 / 4.36 / 3.67 and AMED-Plugin 10.81 / 6.61 / 3.65 / 2.63 with predictors trained by
``configs/amed_cifar10.py --config.model=...`` on this network (diff-solvers' DEIS-tAB3:
56.01 / 14.39 / 6.94 / 4.68). EDM's own Heun sampler at 35 NFE gives FID 1.97 on it.

The sampler's time is EDM's sigma (``config.sde.name = 'edm'``: alpha = 1, sigma = t on
[0.002, 80], the range diff-sampler uses); the network is EDM's VP-preconditioned DDPM++
(``deis_jax.models.edm.family``), an x0 prediction. Sampling defaults to iPNDM-3 at NFE 10
on EDM's rho = 7 grid (``karras``).
"""

import ml_collections

from configs.default import get_default_config
from configs.tables import add_table_fields

# EDM's constructor kwargs of the published pickle (its net.init_kwargs), as
# tests/fixtures/edm/tree_edm-cifar10-32x32-uncond-vp.json records them
CIFAR10_UNCOND_VP = dict(
    img_resolution=32,
    img_channels=3,
    label_dim=0,
    use_fp16=False,
    augment_dim=9,
    model_type="SongUNet",
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=128,
    channel_mult=[2, 2, 2],
    dropout=0.13,
)


def edm_block(precond_class: str, kwargs: dict) -> ml_collections.ConfigDict:
    """``config.model`` of an EDM network (``deis_jax.models.edm.family``); its compute
    ``dtype`` is float16 when EDM's ``use_fp16`` is set (as EDM samples it), else float32."""
    dtype = "float16" if kwargs.get("use_fp16") else "float32"
    return ml_collections.ConfigDict(
        {"name": "edm", "precond_class": precond_class, "kwargs": dict(kwargs), "dtype": dtype}
    )


def edm_config(data_name: str, precond_class: str, kwargs: dict, table: str, checkpoint: str):
    """An image config sampling EDM's network ``kwargs`` on EDM's schedule."""
    config = get_default_config()
    config.mode = "sample"
    config.sde = ml_collections.ConfigDict({"name": "edm", "sigma_min": 0.002, "sigma_max": 80.0})
    config.model = edm_block(precond_class, kwargs)
    config.data.name = data_name
    config.data.image_size = kwargs["img_resolution"]
    config.data.num_channels = kwargs["img_channels"]
    config.data.centered = True
    config.sampler.method = "ipndm"
    config.sampler.order = 3
    config.sampler.grid = "karras"
    config.sampling.checkpoint = checkpoint
    config.sampling.batch_size = 256
    config = add_table_fields(config, table)
    config.eval.reference_stats = f"checkpoints/fid-refs/{_reference_name(kwargs)}.npz"
    return config


def _reference_name(kwargs: dict) -> str:
    size = kwargs["img_resolution"]
    return f"{'imagenet' if kwargs.get('label_dim') == 1000 else 'cifar10'}-{size}x{size}"


def get_config():
    return edm_config(
        "cifar10",
        "VPPrecond",
        CIFAR10_UNCOND_VP,
        table="amed_cifar10",
        checkpoint="checkpoints/converted/edm-cifar10-32x32-uncond-vp",
    )
