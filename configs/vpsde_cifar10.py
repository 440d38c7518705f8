"""VP SDE on CIFAR-10 with DDPM++ (deep, continuous): the model the DEIS paper samples.

    python main.py --config=configs/vpsde_cifar10.py --workdir=runs/vpsde_cifar10 --mode=train
    python main.py --config=configs/vpsde_cifar10.py --workdir=runs/vpsde_cifar10 --mode=sample

score_sde's ``configs/vp/cifar10_ddpmpp_deep_continuous.py``: 106.6M parameters, batch 128,
950k steps of Adam 2e-4 (score_sde reports FID 2.41 with its PC sampler; the DEIS paper
reports tAB-3 FID ~4.2 at NFE 10 with the published checkpoint 8). Training needs prepared
``cifar10`` (``scripts/prepare_data.py``) and accelerators. Instead of training, sample from
the published checkpoint: download ``vp/cifar10_ddpmpp_deep_continuous/checkpoint_8`` from
https://github.com/yang-song/score_sde into ``checkpoints/``, convert it with
``scripts/convert_score_sde_checkpoint.py --model_config vp_cifar10_ddpmpp_deep_continuous``
and pass ``--config.sampling.checkpoint=<converted dir>``. Sampling writes
``<workdir>/samples/tab3_nfe10_quadratic/{samples.npz,samples.png}``.
"""

from configs.default import get_default_config, model_block
from configs.tables import add_table_fields


def get_config():
    config = get_default_config()
    config.model = model_block("vp_cifar10_ddpmpp_deep_continuous")
    config.data.centered = True
    config.training.reduce_mean = True
    config.training.n_iters = 950_001
    return add_table_fields(config)  # --mode=table fields (configs/tables.py)
