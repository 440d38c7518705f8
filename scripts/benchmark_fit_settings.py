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
from deis_jax.common.reporting import write_csv, write_results  # noqa: E402
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
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="fits per setting, each on other fitting points and minibatches",
    )
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
    x_held = np.asarray(schedule.prior_sample(key_heldout, (args.num_heldout, args.dim),
                                              np.float64))  # fmt: skip
    solve = dict(t0=1e-3, t1=1.0, num_points=fit.teacher_points, substeps=fit.teacher_substeps,
                 keep_states=False)  # fmt: skip
    reference = solve_teacher(schedule, eps_fn, x_held, **solve)
    fits = []  # (x_fit, teacher) of each repeat
    for repeat in range(args.repeats):
        key = jax.random.fold_in(key_fit, repeat) if repeat else key_fit
        x_fit = np.asarray(schedule.prior_sample(key, (fit.num_fit, args.dim), np.float64))
        fits.append((x_fit, solve_teacher(schedule, eps_fn, x_fit, **solve)))
    rows, runs = [], []

    def measure(label, nfe, plans, seconds=None, updates=None):
        """One row: the measures averaged over the repeats' plans (each run in ``runs``)."""
        measures = []
        for repeat, plan in enumerate(plans):
            d = endpoint_distances(plan, eps_fn, x_held, reference.x0)
            measures.append({"median": float(np.median(d)), "mean": float(np.mean(d)),
                             "sqrt_mean_sq": float(np.sqrt(np.mean(d**2))),
                             "max": float(np.max(d))})  # fmt: skip
            runs.append({"nfe": nfe, "sampler": label, "repeat": repeat, **measures[-1]})
        rows.append({"nfe": nfe, "sampler": label, "repeats": len(plans),
                     **{k: float(np.mean([m[k] for m in measures])) for k in measures[0]},
                     "fit_cpu_seconds": seconds, "updates": updates})  # fmt: skip
        print(rows[-1], flush=True)

    for nfe in args.nfes:
        for afs in (False, True):
            plan = deis.make_plan(schedule, method="ipndm", order=3, nfe=nfe, afs=afs, t0=1e-3,
                                  t1=1.0)  # fmt: skip
            measure(f"iPNDM-3{' + AFS' if afs else ''} (untrained)", nfe, [plan])
        for loss in args.losses:
            for max_delta in args.max_deltas:
                plans, seconds, updates = [], 0.0, 0
                for repeat, (x_fit, teacher) in enumerate(fits):
                    start = time.process_time()
                    grid = deis.optimize_grid(
                        schedule, eps_fn, x_fit, method="ipndm", order=3, nfe=nfe, afs=True,
                        t0=1e-3, t1=1.0, teacher=teacher, learn_table=True,
                        max_delta=max_delta, loss=loss, fit_dtype=fit.fit_dtype,
                        ld3_settings={**fit.ld3.to_dict(), "seed": repeat},
                    )  # fmt: skip
                    seconds += time.process_time() - start
                    updates += grid.provenance["fit"]["steps_run"]
                    plans.append(grid.plan(schedule))
                label = f"iPNDM-3 + LD3 + table + AFS, loss={loss}, max_delta={max_delta:g}"
                measure(label, nfe, plans, seconds / len(fits), updates / len(fits))
    header = (
        f"# LD3 settings on the {args.dim}-D {args.mixture} mixture\n\n"
        f"Command: `python scripts/benchmark_fit_settings.py {' '.join(sys.argv[1:])}`. "
        f"Per-sample RMS distance d to a fine RK4 reference on {args.num_heldout} held-out "
        f"starting points (its error estimate {reference.error_estimate:.1e}); each fit on "
        f"{fit.num_fit} others with the settings of configs/fit_gmm.py, {args.repeats} "
        f"fit(s) per setting on other fitting points and minibatches, their measures averaged "
        f"(each fit's in {args.out}_runs.csv).\n\n"
    )
    write_csv(args.out + "_runs.csv", runs, list(runs[0]))
    print(write_results(args.out, rows, header))


if __name__ == "__main__":
    main()
