"""VE SDE on CIFAR-10 with NCSN++ (continuous), score_sde's ``ve/cifar10_ncsnpp_continuous``.

    python main.py --config=configs/vesde_cifar10.py --workdir=runs/vesde_cifar10 --mode=train
    python main.py --config=configs/vesde_cifar10.py --workdir=runs/vesde_cifar10 --mode=sample

62.8M parameters (Fourier embedding of sigma, FIR resampling, residual input pyramid,
``scale_by_sigma``: the network outputs the score), inputs in [0, 1] (``centered=False``),
sigma in [0.01, 50], EMA 0.999, 1.3M steps at batch 128 (score_sde: FID 2.38 with PC
sampling). Sampling uses DEIS tAB-3 with NFE 10 from t = 1 to t0 = 1e-5 and writes
``<workdir>/samples/tab3_nfe10_quadratic/{samples.npz,samples.png}``; for the published
weights download ``ve/cifar10_ncsnpp_continuous`` from https://github.com/yang-song/score_sde,
convert it (``--model_config ve_cifar10_ncsnpp_continuous``) and set
``--config.sampling.checkpoint``.
"""

from configs.default import get_default_config, model_block
from configs.tables import add_table_fields


def get_config():
    config = get_default_config()
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 50.0
    config.model = model_block("ve_cifar10_ncsnpp_continuous")
    config.data.centered = False
    config.training.ema_rate = 0.999
    config.training.reduce_mean = False
    return add_table_fields(config)  # --mode=table fields (configs/tables.py)
