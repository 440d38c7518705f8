"""Fitted grids on the digits model (``--mode=fit``): FD-digits and held-out RMSE.

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=train
    python main.py --config=configs/fit_digits.py --workdir=runs/digits

Uses the digits model trained in the workdir (its EMA parameters, as ``--mode=sample``).
iPNDM-3 and DPM-Solver++(2M) at NFE 4, 5, 6 and 10 on their default grid, the GITS grid and
the LD3 grid; every cell is measured by the RMSE against a fine RK4 solve on 128 held-out
starting points and by FD-digits on ``eval.num_samples`` images (the ``--mode=table``
metric). Outputs go to ``<workdir>/`` (``results.md``, ``grids/``, plots).
"""

from configs import fit_gmm, vpsde_digits


def get_config():
    config = vpsde_digits.get_config()
    config.mode = "fit"
    config.fit = fit = fit_gmm.fit_block()
    fit.methods = ("ipndm3", "dpmpp2")
    fit.nfes = (4, 5, 6, 10)
    fit.variants = ("gits", "ld3")
    fit.fixed_grids = ()
    fit.num_fit = 64
    fit.num_heldout = 128
    fit.teacher_substeps = 2
    fit.heldout_substeps = 4
    fit.ld3.steps = 150
    fit.ld3.patience = 25
    fit.plot_nfe = 5
    fit.x64 = False  # a float32 network
    fit.fd = True
    config.eval.num_samples = 500
    return config
