"""The embedded default main job: every sampler on a Gaussian mixture with an exact score.

    python main.py --config=configs/gmm_vpsde.py --workdir=runs/gmm

No download, no checkpoint, a few minutes on 2 CPU cores. For each data dimension (2, 64 and
3072 = CIFAR-10 size) it samples the same x_T with every method in ``compare.methods`` at every
NFE in ``compare.nfes``, measures the RMSE against a high-accuracy reference solve (RK4 in rho,
validated by step doubling) and the excess NLL of the samples under the true density, and writes
to --workdir: results.csv, results.md, error_vs_nfe.png, samples_2d.png (and results.jsonl,
the per-cell cache that lets a killed run resume).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.mode = "compare"
    config.seed = 0

    config.sde = ml_collections.ConfigDict()
    config.sde.name = "vpsde"
    config.sde.schedule = "linear"
    config.sde.beta_min = 0.1
    config.sde.beta_max = 20.0
    config.sde.num_scales = 1000

    # The default sampler (used by `--mode=sample`-style jobs and as the base of each cell).
    config.sampler = ml_collections.ConfigDict()
    config.sampler.method = "tab"
    config.sampler.order = 3
    config.sampler.nfe = 10
    # None: each method's own default grid (quadratic t for the DEIS family, log-SNR for
    # DPM-Solver++/UniPC, Karras rho for ER-SDE); set a kind to force one grid for all.
    config.sampler.grid = ml_collections.FieldReference(None, field_type=str)
    config.sampler.grid_power = ml_collections.FieldReference(None, field_type=float)
    config.sampler.t0 = 1e-3
    config.sampler.t1 = 1.0
    config.sampler.final_denoise = False
    # The rhoRK rows spend s * ceil(NFE / s) at each budget, as in the DEIS paper's table (the
    # report's "NFE spent" column): their budgets are rounded up, not refused.
    config.sampler.nfe_rounding = "up"
    config.sampler.options = ml_collections.ConfigDict()
    # With grid="optimized": a grid file written by --mode=fit (configs/fit_gmm.py).
    config.sampler.grid_file = ml_collections.FieldReference(None, field_type=str)
    config.sampler.predictor_file = ml_collections.FieldReference(None, field_type=str)
    config.sampler.fitted_file = ml_collections.FieldReference(None, field_type=str)

    config.data = ml_collections.ConfigDict()
    config.data.name = "gmm"
    config.data.dims = (2, 64, 3072)
    config.data.num_components = 8
    config.data.ring_std = 0.2  # dim 2: a ring of 8 Gaussians of radius 1.5
    # dim > 2: means on a sphere of `radius` in a random `latent_dim`-dim subspace, std `std`
    config.data.latent_dim = 8
    config.data.radius = 3.0
    config.data.std = 0.5

    config.compare = ml_collections.ConfigDict()
    # name[order][:key=value,...]; see deis_jax.sampling.method_spec.
    config.compare.methods = (
        "ddim",
        "tab1",
        "tab2",
        "tab3",
        "rhoab1",
        "rhoab2",
        "rhoab3",
        "ipndm3",
        "rhork2",
        "rhork3",
        "rhork4",
        "dpmpp2",
        "dpmpp3",
        "unipc2",
        "sddim",  # stochastic (lambda = 1, ancestral DDPM): distribution metric only
        "ersde3",  # stochastic
    )
    config.compare.nfes = (3, 5, 10, 20, 50)
    config.compare.num_samples = 500
    config.compare.reference_steps = 100  # RK4 steps; validated against 2x as many
    config.compare.scatter_nfe = 10
    config.compare.x64 = True
    return config
