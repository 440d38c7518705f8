"""Fitted grids and fit_sampler on the digits model (``--mode=fit``): FD-digits, held-out RMSE.

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=train
    python main.py --config=configs/fit_digits.py --workdir=runs/digits

Uses the digits model trained in the workdir (its EMA parameters, as ``--mode=sample``).
iPNDM-3 at NFE 4, 5, 6 and 10 on its default grid, the GITS grid and the LD3 grid, and
``fit_sampler``'s automatic recipe (``recipe:auto``; its AMED-Plugin reads the network's
bottleneck); every cell is measured by the RMSE against a fine RK4 solve on 32 held-out
starting points and by FD-digits on ``eval.num_samples`` images (the ``--mode=table`` metric).
Outputs go to ``<workdir>/`` (``results.md``, ``grids/``, plots). Sized for 2 CPU cores, where
one network call on 64 digits takes about 0.3 s: 24 + 8 fitting starting points, 40 LD3 steps
and 60 AMED steps on batches of 8.
"""

from configs import fit_gmm, vpsde_digits


def get_config():
    config = vpsde_digits.get_config()
    config.mode = "fit"
    config.fit = fit = fit_gmm.fit_block()
    fit.methods = ("ipndm3",)
    fit.nfes = (4, 5, 6, 10)
    fit.variants = ("gits", "ld3")
    fit.recipes = ("auto",)
    fit.fixed_grids = ()
    fit.num_fit = 32
    fit.num_heldout = 32
    fit.teacher_substeps = 1
    fit.heldout_substeps = 2
    fit.ld3.steps = 40
    fit.ld3.batch_size = 8
    fit.ld3.patience = 15
    fit.amed.steps = 60
    fit.amed.batch_size = 8
    fit.amed.patience = 20
    fit.plot_nfe = 5
    fit.x64 = False  # a float32 network
    fit.fd = True
    config.eval.num_samples = 500
    return config
