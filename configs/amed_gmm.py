"""AMED on the exact-score mixtures (``--mode=fit``, feature-free predictor), held-out RMSE.

    python main.py --config=configs/amed_gmm.py --workdir=runs/amed_gmm

For the 64-D and 3072-D mixtures of ``configs/gmm_vpsde.py`` at NFE 3, 5 and 7: AMED-Solver
and AMED-Plugin on iPNDM (both with AFS, the paper's NFE accounting) with a trained
predictor (variant ``amed``) against their base solvers (variant ``default``: ``r = 1/2``,
i.e. DPM-Solver-2 and iPNDM on the doubled grid, with AFS), and against iPNDM-3 and tAB-3 on
their default grids and on LD3-fitted grids (``configs/fit_gmm.py``). The exact mixtures have
no bottleneck, so the predictor is the feature-free one (one learned r, c, a per step). Every
cell is measured by the RMSE against a fine RK4 reference on 512 held-out starting points.
The README's AMED table comes from this run (``results.md``; predictor files under
``grids/``).
"""

from configs import fit_gmm

AMED_SOLVER = "amed:afs=true,predictor=stepwise"
AMED_PLUGIN = "amed_ipndm3:afs=true,predictor=stepwise,scale_time=0.2"


def get_config():
    config = fit_gmm.get_config()
    fit = config.fit
    fit.methods = (AMED_SOLVER, AMED_PLUGIN, "ipndm3", "tab3")
    fit.nfes = (3, 5, 7)
    fit.variants = ("ld3", "amed")
    fit.recipes = ()  # fit_sampler's cells: configs/fit_gmm.py
    config.data.scattered.dims = ()  # the embedded mixtures only, as the AMED table
    fit.fixed_grids = ()
    fit.amed.learning_rate = 0.05  # per-step logits: a larger step than the network's 5e-3
    fit.amed.steps = 400
    fit.amed.batch_size = 32
    fit.plot_nfe = 5
    return config
