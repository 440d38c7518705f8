"""EPD-Solver, EPD-Plugin and AdaSDE on the digits model (``--mode=fit``): FD-digits at NFE 3, 5, 7.

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=train
    mkdir -p runs/epd_digits
    cp -r runs/digits/checkpoints runs/digits/config.json runs/epd_digits/
    python main.py --config=configs/epd_digits.py --workdir=runs/epd_digits

Uses the digits model trained in the workdir (its EMA parameters, as ``--mode=sample``),
copied into a workdir of its own (the ``:features`` run below writes EPD's files under the
same names).
EPD-Solver and EPD-Plugin on iPNDM (K = 2), AdaSDE (K = 1) and AMED-Plugin, each with AFS and
a table fitted from its neutral start (variant ``amed``) next to its untrained rule
(``default``), and the base solvers iPNDM-3 and tAB-3 on their default grids, at (parallel)
NFE 3, 5 and 7 (``fit.budget = "parallel_nfe"``; ``results.csv`` keeps both counts). Every
cell is measured by FD-digits on ``eval.num_samples`` images and by the RMSE against a fine RK4
solve on 32 held-out starting points. The fitting settings are ``configs/amed_digits.py``'s
(120 Adam updates on batches of 8, 48 + 16 starting points), the same for every learned
method. About 1.5 hours on 2 CPU cores. Details: ``docs/epd_adasde.md``.

``configs/epd_digits.py:features`` trains EPD-Solver alone with the papers' feature loss in
EPD's pixel-model regime (``fit.amed.loss = "features_endpoint"``: the final states compared
in the feature space of ``config.eval``'s network, here the digits classifier that FD-digits
uses), to set beside the L2 rows of the run above:

    python main.py --config=configs/epd_digits.py:features --workdir=runs/epd_digits_features
        (after copying the model into runs/epd_digits_features as above)
"""

from configs import amed_digits, epd_gmm

LOSSES = ("l2", "features")


def get_config(loss: str = "l2"):
    """``loss``: ``l2`` (the default, every method) or ``features`` (EPD-Solver with the
    feature loss)."""
    if loss not in LOSSES:
        raise ValueError(
            f"configs/epd_digits.py:<loss> must be one of {list(LOSSES)}, got {loss!r}"
        )
    config = amed_digits.get_config()
    fit = config.fit
    fit.methods = (epd_gmm.EPD, epd_gmm.EPD_PLUGIN, epd_gmm.ADASDE, amed_digits.AMED_PLUGIN,
                   "ipndm3", "tab3")  # fmt: skip
    fit.budget = "parallel_nfe"
    fit.variants = ("amed",)
    if loss == "features":
        fit.methods = (epd_gmm.EPD,)
        fit.amed.loss = "features_endpoint"
    return config
