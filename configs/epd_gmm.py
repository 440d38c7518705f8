"""EPD-Solver, EPD-Plugin and AdaSDE on the exact-score mixtures (``--mode=fit``), held-out RMSE.

    python main.py --config=configs/epd_gmm.py --workdir=runs/epd_gmm

For the 64-D and 3072-D mixtures of ``configs/gmm_vpsde.py`` at (parallel) NFE 3, 5, 7 and 9
(``fit.budget = "parallel_nfe"``: EPD's count, sequential rounds of network calls; the same
as the NFE for every sequential method; ``results.csv`` keeps both): EPD-Solver and
EPD-Plugin on iPNDM (K = 2 probes, q_max = 3), AdaSDE (K = 1) and AMED-Plugin, all with AFS
and trained tables (variant ``amed``: ``fit_amed`` from the neutral start, the same 400 Adam
steps at lr 0.05 for every learned method) against their untrained (neutral) rule
(``default``), iPNDM-3 / UniPC-2 / DPM-Solver++(2M) on their default and two fixed grids (the
best fixed grid) and ``fit_sampler``'s iPNDM-3 + LD3 grid + learned table + AFS. Every cell is
measured by the RMSE against a fine RK4 reference on 512 held-out starting points; AdaSDE's
noise is keyed per held-out sample (``fit.amed.seed``). Details: ``docs/epd_adasde.md``.
"""

from configs import amed_gmm

EPD = "epd:afs=true"
EPD_PLUGIN = "epd_ipndm2:afs=true"
ADASDE = "adasde:afs=true"


def get_config():
    config = amed_gmm.get_config()
    fit = config.fit
    fit.methods = (EPD, EPD_PLUGIN, ADASDE, amed_gmm.AMED_PLUGIN, "ipndm3", "unipc2", "dpmpp2")
    fit.nfes = (3, 5, 7, 9)
    fit.budget = "parallel_nfe"
    fit.variants = ("amed",)
    fit.fixed_grids = ("quadratic", "log_snr")
    fit.recipes = ("ipndm3+ld3+table+afs",)
    return config
