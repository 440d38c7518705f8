"""A small VP / DDPM++ model on scikit-learn's digits (16x16, 1 channel): trains on a laptop.

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=train
    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=sample

No download: the 1797 8x8 digits bundled with scikit-learn, bilinearly upsampled to 16x16.
A small DDPM++ (score_sde's ncsnpp with nf 32, ch_mult (1, 2), one BigGAN residual block per
level, attention at 8x8, positional embedding of 999 t; 0.75M parameters) is trained with
score_sde's VP loss for 1500 steps at batch 64: about 11 minutes on 2 shared CPU cores (see
docs/training.md), then EMA weights (0.999 with warm-up). Sampling
with DEIS tAB-3 at NFE 10 writes ``runs/digits/samples/tab3_nfe10_quadratic/samples.png``
with recognisable digits (cf. ``results/digits_samples_tab3_nfe10.png``).
"""

from configs.default import get_default_config, model_block
from configs.tables import add_table_fields


def get_config():
    config = get_default_config()
    config.seed = 0
    config.model = model_block(
        "vp_cifar10_ddpmpp_continuous",
        nf=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        dropout=0.0,
    )
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.num_channels = 1
    config.data.centered = True
    config.data.random_flip = False  # mirrored digits are not digits
    config.training.batch_size = 64
    config.training.n_iters = 1500
    config.training.log_every = 50
    config.training.checkpoint_every = 500
    config.training.lr = 2e-3
    config.training.warmup = 100
    config.training.ema_rate = 0.999
    config.training.ema_warmup = True
    config.training.reduce_mean = True
    config.sampling.num_samples = 100
    config.sampling.batch_size = 100
    return add_table_fields(config)  # --mode=table fields (configs/tables.py)
