"""The LD3 settings behind the defaults: objective and correction bound, judged held out.

    python scripts/benchmark_fit_settings.py   # objectives on the scattered 3072-D mixture
    python scripts/benchmark_fit_settings.py --mixture embedded --dim 64 --nfes 3 5 10 \\
        --losses rms --max-deltas 0.3 0.5 1.0 --out results/benchmark_fit_max_delta

iPNDM-3 + LD3 + table + AFS (``optimize_grid``) is fitted with every combination of
``--losses`` (``deis_jax.fitting.ld3.LOSSES``) and ``--max-deltas`` on 128 starting points (the
other settings of ``configs/fit_gmm.py``) and measured on ``--num-heldout`` others against a
fine RK4 reference by each sample's RMS distance d: the median (the typical sample), the mean
and ``sqrt(mean d^2)``, which a few samples ending in another component of the outlier-prone
mixture (``GaussianMixture.scattered``) own. The defaults ``ld3.DEFAULT_LOSS`` and
``ld3.DEFAULT_MAX_DELTA`` were chosen from these tables (``results/benchmark_fit_*.md``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deis_jax as deis  # noqa: E402
from configs import fit_gmm  # noqa: E402
from deis_jax.common.reporting import write_results  # noqa: E402
from deis_jax.fitting import ld3  # noqa: E402
from deis_jax.fitting.optimize import endpoint_distances  # noqa: E402
from deis_jax.fitting.teacher import solve_teacher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--nfes", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--mixture", choices=("embedded", "scattered"), default="scattered")
    parser.add_argument("--losses", nargs="+", default=list(ld3.LOSSES), choices=ld3.LOSSES)
    parser.add_argument("--max-deltas", type=float, nargs="+", default=[ld3.DEFAULT_MAX_DELTA])
    parser.add_argument("--num-heldout", type=int, default=256)
    parser.add_argument("--out", default="results/benchmark_fit_losses")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    fit = fit_gmm.fit_block()
    schedule = deis.VPSDE.linear()
    mixture = (
        deis.GaussianMixture.embedded(args.dim, 8, 8, 3.0, 0.5, seed=0)
        if args.mixture == "embedded"
        else deis.GaussianMixture.scattered(args.dim)
    )
    eps_fn = mixture.eps_fn(schedule)
    key_fit, key_heldout = jax.random.split(jax.random.PRNGKey(0))
    x_fit = np.asarray(schedule.prior_sample(key_fit, (fit.num_fit, args.dim), np.float64))
    x_held = np.asarray(schedule.prior_sample(key_heldout, (args.num_heldout, args.dim),
                                              np.float64))  # fmt: skip
    solve = dict(t0=1e-3, t1=1.0, num_points=fit.teacher_points, substeps=fit.teacher_substeps,
                 keep_states=False)  # fmt: skip
    teacher = solve_teacher(schedule, eps_fn, x_fit, **solve)
    reference = solve_teacher(schedule, eps_fn, x_held, **solve)
    rows = []

    def measure(label, nfe, plan, seconds=None, updates=None):
        d = endpoint_distances(plan, eps_fn, x_held, reference.x0)
        rows.append({"nfe": nfe, "sampler": label, "median": float(np.median(d)),
                     "mean": float(np.mean(d)), "sqrt_mean_sq": float(np.sqrt(np.mean(d**2))),
                     "max": float(np.max(d)), "fit_cpu_seconds": seconds,
                     "updates": updates})  # fmt: skip
        print(rows[-1], flush=True)

    for nfe in args.nfes:
        for afs in (False, True):
            plan = deis.make_plan(schedule, method="ipndm", order=3, nfe=nfe, afs=afs, t0=1e-3,
                                  t1=1.0)  # fmt: skip
            measure(f"iPNDM-3{' + AFS' if afs else ''} (untrained)", nfe, plan)
        for loss in args.losses:
            for max_delta in args.max_deltas:
                start = time.process_time()
                grid = deis.optimize_grid(
                    schedule, eps_fn, x_fit, method="ipndm", order=3, nfe=nfe, afs=True,
                    t0=1e-3, t1=1.0, teacher=teacher, learn_table=True, max_delta=max_delta,
                    loss=loss, ld3_settings=dict(fit.ld3.to_dict()), fit_dtype=fit.fit_dtype,
                )  # fmt: skip
                label = f"iPNDM-3 + LD3 + table + AFS, loss={loss}, max_delta={max_delta:g}"
                measure(label, nfe, grid.plan(schedule), time.process_time() - start,
                        grid.provenance["fit"]["steps_run"])  # fmt: skip
    header = (
        f"# LD3 settings on the {args.dim}-D {args.mixture} mixture\n\n"
        f"Command: `python scripts/benchmark_fit_settings.py {' '.join(sys.argv[1:])}`. "
        f"Per-sample RMS distance d to a fine RK4 reference on {args.num_heldout} held-out "
        f"starting points (its error estimate {reference.error_estimate:.1e}); fits on "
        f"{fit.num_fit} others with the settings of configs/fit_gmm.py.\n\n"
    )
    print(write_results(args.out, rows, header))


if __name__ == "__main__":
    main()
