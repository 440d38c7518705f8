"""Sweep: a few samplers x NFE budgets on the embedded Gaussian-mixture job (minutes on CPU).

    python main.py --config=configs/sweeps/gmm_methods.py --workdir=runs/sweep_gmm_methods

Any field of the base config (``configs/gmm_vpsde.py``) can still be overridden on the command
line, e.g. ``--config.data.dims=(2,)`` or ``--config.compare.num_samples=200``. Writes
``sweep.jsonl`` (one line per finished point; a killed sweep resumes), ``sweep.csv``,
``sweep.md`` and ``sweep.png`` to --workdir. See ``deis_jax/experiments/sweep/cells.py`` for the
format and ``docs/scale.md`` for running it on several GPUs or a TPU pod.
"""

import os

from deis_jax.experiments.sweep.cells import load_config_file, sweep_block

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "gmm_vpsde.py")


def get_config():
    config = load_config_file(BASE)
    config.mode = "sweep"
    config.data.dims = (2, 64)
    config.compare.num_samples = 512  # a multiple of common device counts (no padding)
    config.sweep = sweep_block(
        axes=(
            # method specs: name[order][:key=value,...] (deis_jax.sampling.method_spec)
            ("sampler.spec", ("ddim", "tab3", "rhoab3", "ipndm3", "dpmpp2", "sddim")),
            ("sampler.nfe", (5, 10, 20)),
            # A zipped axis moves several fields together, e.g.
            # (("sampler.grid", "sampler.t0"), (("quadratic", 1e-3), ("log_snr", 1e-3))),
        ),
        evaluator="gmm",
        x="sampler.nfe",
        metrics=("rmse", "nll_gap"),
    )
    return config
