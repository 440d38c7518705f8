"""Fitted grids and tables on the exact-score mixtures (``--mode=fit``), measured held-out.

    python main.py --config=configs/fit_gmm.py --workdir=runs/fit_gmm

For the 64-D and 3072-D mixtures of ``configs/gmm_vpsde.py`` and the outlier-prone 3072-D
mixture ``scattered3072`` (16 full-dimensional components, ``GaussianMixture.scattered``):
tAB-3, iPNDM-3, DPM-Solver++(2M) and UniPC-2 at NFE 3-10 on their default grid, on four fixed
grid kinds, on the GITS and LD3 grids and with a learned table (LD3 grid + bounded coefficient
corrections), and ``fit_sampler``'s automatic recipe, each measured by the per-sample distance
to a fine RK4 reference on 512 held-out starting points (mean, median, RMSE). The README's
fitting tables come from this run (``results.md``; the fitted files are under ``grids/``).
"""

import ml_collections

from configs import gmm_vpsde


def fit_block() -> ml_collections.ConfigDict:
    """The ``config.fit`` fields of ``--mode=fit`` (see ``deis_jax.experiments.fit``)."""
    fit = ml_collections.ConfigDict()
    fit.methods = ("tab3", "ipndm3", "dpmpp2", "unipc2")
    fit.nfes = (3, 4, 5, 6, 8, 10)
    fit.variants = ("gits", "ld3", "ld3+table")
    fit.recipes = ()  # fit_sampler cells: "auto" or recipe names (deis_jax.fitting.recipes)
    fit.loss = "rms"  # the LD3 objective over samples (deis_jax.fitting.ld3.LOSSES)
    fit.fit_dtype = "float32"  # the LD3 loop's precision (measurements stay float64)
    fit.fixed_grids = ("linear", "quadratic", "karras", "log_snr")
    fit.num_fit = 128  # starting points to fit on: train + validation
    fit.validation_fraction = 0.25
    fit.num_heldout = 512  # starting points to measure on, never fitted on
    fit.teacher_points = 61  # the fine grid GITS searches (the GITS default)
    fit.teacher_grid = "log_snr"
    fit.teacher_substeps = 4  # RK4 steps per fine interval
    fit.heldout_substeps = 8
    fit.max_delta = 1.0  # scale of the learned corrections (deis_jax.sampling.learned)
    fit.gits_metric = "l2"
    fit.gits_gamma = 1.15
    fit.ld3 = ml_collections.ConfigDict(
        {"steps": 200, "learning_rate": 0.05, "final_lr_fraction": 0.05, "patience": 50,
         "seed": 0}
    )  # fmt: skip
    fit.ld3.batch_size = ml_collections.FieldReference(32, field_type=int)  # None: all
    fit.amed = amed_block()
    fit.plot_nfe = 5
    fit.x64 = True
    fit.params = "checkpoint"  # image models: checkpoint | random
    fit.fd = False  # image models: also FD / FID of every cell (config.eval)
    return fit


def amed_block() -> ml_collections.ConfigDict:
    """``config.fit.amed``: training of AMED predictors (variant ``amed``)."""
    amed = ml_collections.ConfigDict()
    amed.loss = "auto"  # teacher-forced (one-step students) / endpoint (multistep): fitting/amed.py
    # "features" / "features_endpoint" (image models): the final state in config.eval's
    # feature network (FID Inception / digits classifier), weighted by feature_weight
    amed.feature_weight = 10.0  # the papers' alpha (EPD 10; AdaSDE 20-50)
    amed.steps = 300  # Adam updates (AMED: about 80 batches of 128 per step on CIFAR-10)
    amed.learning_rate = 5e-3  # AMED's
    amed.batch_size = ml_collections.FieldReference(32, field_type=int)  # None: all
    amed.patience = 60
    amed.seed = 0
    return amed


def get_config() -> ml_collections.ConfigDict:
    config = gmm_vpsde.get_config()
    config.mode = "fit"
    config.data.dims = (64, 3072)
    config.data.scattered = ml_collections.ConfigDict(
        {"dims": (3072,), "num_components": 16, "radius": 30.0, "std_range": (0.3, 0.8)}
    )  # the outlier-prone mixture (GaussianMixture.scattered)
    config.fit = fit_block()
    config.fit.recipes = ("auto",)
    return config
