"""AMED on CIFAR-10 (``--mode=fit``): train AMED-Solver and AMED-Plugin predictors, then the table.

    python main.py --config=configs/amed_cifar10.py --workdir=runs/amed_cifar10 \
        --config.sampling.checkpoint=checkpoints/converted/vp_cifar10_ddpmpp_deep_continuous_8 \
        --config.eval.inception_weights=checkpoints/inception/pt_inception-2015-12-05.npz
    python main.py --config=configs/amed_cifar10.py --workdir=runs/amed_cifar10 --mode=table \
        --config.table=amed_cifar10 \
        --config.eval.amed_predictors=runs/amed_cifar10/grids/cifar10 \
        --config.sampling.checkpoint=... --config.eval.inception_weights=...

The model is ``configs/vpsde_cifar10.py``'s (score_sde's DDPM++ deep continuous checkpoint 8;
its bottleneck is 4x4, so the predictor reads 16 features). The paper's recipe (AMED,
``amed_ersde.md`` section 1.7): AFS on, AMED-Solver on the time-uniform grid with
``scale_dir = 0.01``, AMED-Plugin on iPNDM on the Karras rho = 7 grid with ``scale_dir = 0.01``
and ``scale_time = 0.2``, Adam 5e-3, batch 128, 10k trajectories (about 80 updates). The
fit run measures each predictor by the RMSE against a fine RK4 solve on held-out x_T (FID
would need 50k samples per cell: the table mode does that). The AMED paper's numbers are on
EDM's CIFAR-10 network (AMED-Solver 18.49 / 7.59 / 4.36 / 3.67 and AMED-Plugin 10.81 / 6.61 /
3.65 / 2.63 FID at NFE 3 / 5 / 7 / 9): with score_sde's network compare the gain over the
base solvers, not the values. Needs an accelerator: one network call on 128 images is about
1 s on a GPU and about 10 s on 2 CPU cores.

The paper's own network: ``--config=configs/amed_cifar10.py:edm`` fits on EDM's
``edm-cifar10-32x32-uncond-vp`` (``configs/edm_cifar10_vp.py``: convert the pickle first; its
bottleneck, ``enc['8x8_block3']``, gives 64 features as in the paper), and
``python main.py --config=configs/edm_cifar10_vp.py --mode=table
--config.eval.amed_predictors=<workdir>/grids/cifar10 ...`` then fills the AMED rows.
"""

from configs import edm_cifar10_vp, fit_gmm, vpsde_cifar10

MODELS = {"score_sde": vpsde_cifar10, "edm": edm_cifar10_vp}

AMED_SOLVER = "amed:afs=true"
AMED_PLUGIN = "amed_ipndm3:afs=true,scale_time=0.2"


def get_config(model: str = "score_sde"):
    """``model``: ``score_sde`` (DDPM++ deep continuous) or ``edm`` (the paper's network)."""
    if model not in MODELS:
        raise ValueError(
            f"configs/amed_cifar10.py:<model> must be one of {list(MODELS)}, got {model!r}"
        )
    config = MODELS[model].get_config()
    config.mode = "fit"
    config.sampler.grid = None  # every method on its own default grid (AMED's, as the table)
    config.fit = fit = fit_gmm.fit_block()
    fit.methods = (AMED_SOLVER, AMED_PLUGIN, "ipndm3", "tab3")
    fit.nfes = (3, 5, 7, 9)
    fit.variants = ("amed",)
    fit.fixed_grids = ()
    fit.num_fit = 10_240  # the paper's 10k trajectories (train + validation)
    fit.validation_fraction = 0.05
    fit.num_heldout = 256
    # The teacher (shared by every fit): 21 points in log-SNR plus the student's grid, 2 RK4
    # steps each -- about 160 network calls per trajectory on 10k trajectories.
    fit.teacher_points = 21
    fit.teacher_substeps = 2
    fit.heldout_substeps = 2
    fit.amed.steps = 80
    fit.amed.batch_size = 128
    fit.amed.patience = 80
    fit.x64 = False  # a float32 network
    fit.fd = False
    return config
