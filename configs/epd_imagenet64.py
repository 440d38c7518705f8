"""EPD-Solver, EPD-Plugin, AdaSDE and AMED on EDM's class-conditional ImageNet-64 ADM
(``--mode=fit``), then the papers' ImageNet-64 tables.

    python main.py --config=configs/epd_imagenet64.py --workdir=runs/epd_imagenet64 \
        --config.sampling.checkpoint=checkpoints/converted/edm-imagenet-64x64-cond-adm
    python main.py --config=configs/epd_imagenet64.py --workdir=runs/epd_imagenet64 \
        --mode=table --config.table=epd_imagenet64 \
        --config.eval.amed_predictors=runs/epd_imagenet64/grids/imagenet_resized/64x64 \
        --config.sampling.checkpoint=checkpoints/converted/edm-imagenet-64x64-cond-adm \
        --config.eval.inception_weights=checkpoints/inception/pt_inception-2015-12-05.npz

The network, its conversion and the FID reference are ``configs/edm_imagenet64_cond.py``'s.
Every fitting and held-out starting point has a class (``config.sampling.labels``, ``random``
as the papers' uniform random labels; keyed by the point's index), and its teacher, every fit
and the held-out measurement pass it to the network (``deis_jax.experiments.fit``). The fitted
files land in ``grids/imagenet_resized/64x64/`` (the data set's name), which the table mode
reads through ``eval.amed_predictors``.

``:epd`` (the default) fits the learned rows of the ``epd_imagenet64`` table with the released
runs' ImageNet-64 settings (specs/epd_adasde.md §1.5, §2.4): EPD-Solver with K = 2 probes,
``scale_dir`` 0.05 and ``scale_time`` 0.1 on the time-uniform grid; the plugin on iPNDM with
q_max = 3 (order 2, ``scale_time`` 0.2) on EDM's rho = 7 grid; AdaSDE with K = 1,
``gamma_max`` 0.01, ``scale_time`` 0.2; AMED-Solver and AMED-Plugin as the table's AMED rows;
AFS on; NFE 3 / 5 / 7 / 9 counted as the papers' parallel NFE (``fit.budget``). Adam at lr 0.2
(the released runs'), batch 16, 10k trajectories. Trained from the neutral tables by the L2
distance to the teacher; the papers' loss is ``--config.fit.amed.loss=features`` (FID
Inception features of the final state, weight ``fit.amed.feature_weight``, with
``--config.eval.inception_weights``; ``configs/epd_cifar10.py``). The
papers' FIDs (EPD-Solver 18.28 / 6.35 / 5.26 / 4.27, EPD-Plugin 19.89 / 8.17 / 4.81 / 4.02,
AdaSDE 18.51 / 6.90 / 5.26 / 4.59) are printed beside ours by the table mode.

``:amed`` fits only AMED-Solver and AMED-Plugin, with the AMED paper's settings (lr 5e-3,
batch 64, 10k trajectories; ``amed_ersde.md`` §1.7), for the ``amed_imagenet64`` table
(``--config.table=amed_imagenet64`` in the second command; its workdir's grids). Its
AMED-Plugin row is the table's, ``scale_time`` 0.2, where the AMED paper's ImageNet-64 plugin
run used 0.

Both need the checkpoint and an accelerator: not run here (a test runs ``--mode=fit`` end to
end on a tiny random class-conditional network).
"""

from configs import amed_cifar10, edm_imagenet64_cond, epd_cifar10, fit_gmm

VARIANTS = ("epd", "amed")

EPD = epd_cifar10.EPD.format(scale_time=0.1)  # ImageNet-64's released EPD runs
EPD_PLUGIN = epd_cifar10.EPD_PLUGIN
ADASDE = epd_cifar10.ADASDE
AMED_SOLVER = amed_cifar10.AMED_SOLVER
AMED_PLUGIN = amed_cifar10.AMED_PLUGIN


def get_config(variant: str = "epd"):
    """``variant``: ``epd`` (every learned row of ``epd_imagenet64``) or ``amed`` (AMED's
    two, with AMED's settings, for ``amed_imagenet64``)."""
    if variant not in VARIANTS:
        raise ValueError(
            f"configs/epd_imagenet64.py:<variant> must be one of {list(VARIANTS)}, got {variant!r}"
        )
    config = edm_imagenet64_cond.get_config()
    config.mode = "fit"
    config.table = f"{variant}_imagenet64"
    config.sampling.labels = "random"  # the papers': a uniform random class per trajectory
    config.sampler.grid = None  # every method on its own default grid, as the tables' rows
    config.fit = fit = fit_gmm.fit_block()
    fit.nfes = (3, 5, 7, 9)
    fit.variants = ("amed",)
    fit.fixed_grids = ()
    fit.num_fit = 10_240  # the papers' 10k trajectories (train + validation)
    fit.validation_fraction = 0.05
    fit.num_heldout = 256
    # The teacher (shared by every fit): 21 points in log-SNR plus the student's grid, 2 RK4
    # steps each -- about 160 network calls per trajectory on 10k trajectories.
    fit.teacher_points = 21
    fit.teacher_substeps = 2
    fit.heldout_substeps = 2
    fit.x64 = False  # a float16 / float32 network
    fit.fd = False
    if variant == "epd":
        fit.methods = (EPD, EPD_PLUGIN, ADASDE, AMED_SOLVER, AMED_PLUGIN)
        fit.budget = "parallel_nfe"
        fit.amed.learning_rate = 0.2  # the released runs' (raw tables, no network)
        fit.amed.batch_size = 16
        fit.amed.steps = 625  # 10k trajectories at batch 16
        fit.amed.patience = 625
    else:
        fit.methods = (AMED_SOLVER, AMED_PLUGIN, "ipndm3")
        fit.amed.learning_rate = 5e-3  # AMED's
        fit.amed.batch_size = 64
        fit.amed.steps = 160  # 10k trajectories at batch 64
        fit.amed.patience = 160
    return config
