"""EPD-Solver, EPD-Plugin and AdaSDE on CIFAR-10 (``--mode=fit``), then the papers' table.

    python main.py --config=configs/epd_cifar10.py:edm --workdir=runs/epd_cifar10 \
        --config.sampling.checkpoint=<converted edm-cifar10-32x32-uncond-vp> \
        --config.eval.inception_weights=checkpoints/inception/pt_inception-2015-12-05.npz
    python main.py --config=configs/epd_cifar10.py:edm --workdir=runs/epd_cifar10 --mode=table \
        --config.table=epd_cifar10 --config.eval.amed_predictors=runs/epd_cifar10/grids/cifar10 \
        --config.sampling.checkpoint=... --config.eval.inception_weights=...

``:edm`` is the papers' network (``configs/edm_cifar10_vp.py``), ``:score_sde`` this project's
CIFAR-10 checkpoint. The ``epd_imagenet64`` table's files are fitted on EDM's
class-conditional ImageNet-64 ADM by ``configs/epd_imagenet64.py`` (a class per trajectory).
The methods are the rows of the ``epd_cifar10`` table
(``deis_jax.experiments.table.cells``) with the released runs' settings (specs/epd_adasde.md
§1.5, §2.4): K = 2 probes for EPD (``scale_dir`` 0.05, ``scale_time`` 0.05, 0.1 on
ImageNet-64), the plugin on iPNDM with q_max = 3 (order 2, ``scale_time`` 0.2), AdaSDE with
K = 1, ``gamma_max`` 0.01, ``scale_time`` 0.2; AFS on; NFE 3 / 5 / 7 / 9 counted as the
papers' parallel NFE (``fit.budget``). Trained from the neutral tables by the L2 distance to
the teacher, Adam at lr 0.2 as the released runs, batch 32, 10k trajectories. The papers'
loss, the final state's FID-Inception features (weight alpha = 10) after per-step L2, is
``--config.fit.amed.loss=features`` (``features_endpoint``: the final term alone, EPD-Solver's
regime at NFE 3 / 5 / 7); it uses ``config.eval.inception_weights``, checked at start-up.
The papers' FIDs (EPD-Solver 10.40 / 4.33 / 2.82 / 2.49, EPD-Plugin 10.54 / 4.47 / 3.27 /
2.42, AdaSDE 12.62 / 4.18 / 2.88 / 2.56 on CIFAR-10) are printed beside ours by the table
mode. Needs an accelerator and the checkpoints: not run here.
"""

from configs import amed_cifar10

MODELS = amed_cifar10.MODELS

EPD = "epd:afs=true,scale_dir=0.05,scale_time={scale_time}"
EPD_PLUGIN = "epd_ipndm2:afs=true,scale_dir=0.05,scale_time=0.2"
ADASDE = "adasde:afs=true,gamma_max=0.01,scale_dir=0.05,scale_time=0.2"


def get_config(model: str = "edm"):
    """``model``: ``edm`` (the papers' CIFAR-10 network) or ``score_sde``."""
    if model not in MODELS:
        raise ValueError(
            f"configs/epd_cifar10.py:<model> must be one of {list(MODELS)}, got {model!r}"
        )
    config = amed_cifar10.get_config("score_sde")
    base = MODELS[model].get_config()
    for field in ("model", "data", "sde", "sampling", "sampler"):
        config[field] = base[field]
    config.sampler.grid = None  # every method on its own default grid, as the table's rows
    fit = config.fit
    fit.methods = (EPD.format(scale_time=0.05), EPD_PLUGIN, ADASDE, amed_cifar10.AMED_SOLVER,
                   amed_cifar10.AMED_PLUGIN)  # fmt: skip
    fit.budget = "parallel_nfe"
    fit.amed.learning_rate = 0.2  # the released runs' (raw tables, no network)
    fit.amed.batch_size = 32
    fit.amed.steps = 300  # about 10k trajectories at batch 32
    fit.amed.patience = 300
    # the papers' loss: fit.amed.loss = "features" (FID Inception at the last step, alpha =
    # fit.amed.feature_weight); needs config.eval.inception_weights
    return config
