"""AMED on the digits model (``--mode=fit``): FD-digits and held-out RMSE at NFE 3, 5 and 7.

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=train
    python main.py --config=configs/amed_digits.py --workdir=runs/digits

Uses the digits model trained in the workdir (its EMA parameters, as ``--mode=sample``).
AMED-Solver and AMED-Plugin on iPNDM (AFS on, the paper's NFE accounting), each with the
paper's predictor reading the DDPM++ bottleneck (the channel mean of the 8x8 activation,
8,950 / 8,971 parameters), against their base solvers (variant ``default``, ``r = 1/2``),
iPNDM-3 and tAB-3 on their default grids and on LD3 grids. Every cell is measured by the RMSE
against a fine RK4 solve on 32 held-out starting points and by FD-digits on
``eval.num_samples`` images. Sized for 2 CPU cores (about 40 minutes): 48 + 16 training
starting points, 120 Adam updates on batches of 8 per predictor.
"""

from configs import fit_digits

AMED_SOLVER = "amed:afs=true"
AMED_PLUGIN = "amed_ipndm3:afs=true,scale_time=0.2"


def get_config():
    config = fit_digits.get_config()
    config.sampler.grid = None  # every method on its own default grid (AMED's, as the table)
    fit = config.fit
    fit.methods = (AMED_SOLVER, AMED_PLUGIN, "ipndm3", "tab3")
    fit.nfes = (3, 5, 7)
    fit.variants = ("ld3", "amed")
    fit.recipes = ()  # fit_sampler's cells: configs/fit_digits.py
    fit.num_fit = 64
    fit.amed.steps = 120
    fit.amed.batch_size = 8
    fit.amed.patience = 40
    fit.plot_nfe = 5
    return config
