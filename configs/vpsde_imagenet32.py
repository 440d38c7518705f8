"""VP SDE on ImageNet 32x32 (``downsampled_imagenet/32x32``) with continuous DDPM++.

    python main.py --config=configs/vpsde_imagenet32.py --workdir=runs/imagenet32 --mode=train
    python main.py --config=configs/vpsde_imagenet32.py --workdir=runs/imagenet32 --mode=sample

Data: the unlabelled van den Oord et al. (2016) ImageNet 32x32 used for generative modelling
and likelihood benchmarks (the DEIS paper's ImageNet-32 table), *not*
``imagenet_resized/32x32`` (a labelled classification variant with a different resize). Its
tfds download URL is broken; see ``scripts/prepare_data.py --help`` for preparing it from
``train_32x32.tar`` / ``valid_32x32.tar``. Model: score_sde's CIFAR-10 DDPM++ continuous
architecture (61.8M parameters) with the VP recipe; random flips on. Needs accelerators; the
sampler writes ``<workdir>/samples/tab3_nfe10_quadratic/{samples.npz,samples.png}``.
"""

from configs.default import get_default_config, model_block
from configs.tables import add_table_fields


def get_config():
    config = get_default_config()
    config.model = model_block("vp_cifar10_ddpmpp_continuous")
    config.data.name = "downsampled_imagenet/32x32"
    config.data.centered = True
    config.training.reduce_mean = True
    return add_table_fields(config)  # --mode=table fields (configs/tables.py)
