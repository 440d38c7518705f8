"""EDM's class-conditional ImageNet-64 ADM network (``edm-imagenet-64x64-cond-adm``): the
model of ER-SDE-Solver's headline and of the AMED paper's ImageNet-64 numbers.

    python scripts/convert_edm_checkpoint.py --edm-source ~/src/edm \
        --pickle checkpoints/edm/edm-imagenet-64x64-cond-adm.pkl \
        --out checkpoints/converted/edm-imagenet-64x64-cond-adm
    python main.py --config=configs/edm_imagenet64_cond.py --workdir=runs/edm_imagenet64 \
        --mode=sample --config.sampling.labels=fixed --config.sampling.class_label=207
    python main.py --config=configs/edm_imagenet64_cond.py --workdir=runs/edm_imagenet64 \
        --mode=table \
        --config.eval.inception_weights=checkpoints/inception/pt_inception-2015-12-05.npz

Download ``edm-imagenet-64x64-cond-adm.pkl`` (https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/)
and EDM's ``imagenet-64x64.npz`` FID reference (https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/)
into ``checkpoints/``. The table (``ersde_imagenet64``, 50k samples per cell, one random class
per sample) should reproduce ER-SDE-Solver-3's 3.45 FID at 20 NFE and 2.24 at 50 (arXiv
abstract), with AMED's ImageNet-64 peers beside it (iPNDM 58.53 / 18.99 / 9.17 / 5.91,
DPM-Solver-2 (AFS) 140.2 / 42.41 / 12.03 / 6.64 at NFE 3 / 5 / 7 / 9; diff-solvers'
DEIS-tAB3 44.51 / 14.75 / 8.20 / 5.97). EDM's own deterministic Heun sampler at 79 NFE gives
FID 2.44 on it.

Classes: ``config.sampling.labels`` = ``random`` (default; from the seed, per sample),
``fixed`` (``class_label``) or ``cycle`` (all 1000 classes in turn). The published model was
trained without label dropout, so classifier-free guidance (``sampling.guidance_scale``) has
no unconditional model to guide from here; it is there for models that have one. EDM ran
this network in float16 on GPUs; the port computes in float32.
"""

from configs.edm_cifar10_vp import edm_config

# EDM's constructor kwargs of the published pickle (its net.init_kwargs), as
# tests/fixtures/edm/tree_edm-imagenet-64x64-cond-adm.json records them
IMAGENET64_COND_ADM = dict(
    img_resolution=64,
    img_channels=3,
    label_dim=1000,
    use_fp16=True,
    model_type="DhariwalUNet",
    model_channels=192,
    channel_mult=[1, 2, 3, 4],
    dropout=0.1,
)


def get_config():
    config = edm_config(
        "imagenet_resized/64x64",
        "EDMPrecond",
        IMAGENET64_COND_ADM,
        table="ersde_imagenet64",
        checkpoint="checkpoints/converted/edm-imagenet-64x64-cond-adm",
    )
    config.sampling.batch_size = 64
    return config
