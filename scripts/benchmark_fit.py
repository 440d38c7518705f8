"""Cost of fitting a sampler at image size: the teacher, each LD3 fit and ``fit_sampler``.

    python scripts/benchmark_fit.py   # 3072-D mixture, NFE 5 -> results/benchmark_fit.md
    python scripts/benchmark_fit.py --dim 64 --nfe 8 --out /tmp/fit64

The target (issue "Fitted samplers for anyone's model"): fitting at 3072-D for NFE 5 -- the
teacher and one fit (iPNDM-3 + LD3 + table + AFS) on the README's 128 starting points -- in at
most 60 CPU-seconds on 2 cores. Times are CPU seconds of this process (user + system: the
machines are shared, wall time is not a measure), compilation included, as a user pays it;
each fit runs after the one shared teacher (timed separately). The settings are those of
``configs/fit_gmm.py``: float64 teacher and measurements, LD3 loops in float32 on minibatches
of 32, at most 200 updates.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deis_jax as deis  # noqa: E402
from configs import fit_gmm  # noqa: E402
from deis_jax.common.reporting import write_results  # noqa: E402
from deis_jax.fitting.teacher import solve_teacher  # noqa: E402

FITS = (  # label, method, order, afs, learn_table
    ("LD3", "ipndm", 3, False, False),
    ("LD3 + table", "ipndm", 3, False, True),
    ("LD3 + table + AFS", "ipndm", 3, True, True),
)


def cpu_seconds() -> float:
    return time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--mixture", choices=("embedded", "scattered"), default="embedded")
    parser.add_argument("--out", default="results/benchmark_fit")
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
    x_T = schedule.prior_sample(jax.random.PRNGKey(1), (fit.num_fit, args.dim), jax.numpy.float64)
    settings = dict(fit.ld3.to_dict())
    start, wall = cpu_seconds(), time.perf_counter()
    teacher = solve_teacher(schedule, eps_fn, x_T, t0=1e-3, t1=1.0,
                            num_points=fit.teacher_points, grid=fit.teacher_grid,
                            substeps=fit.teacher_substeps, keep_states=False)  # fmt: skip
    teacher_cpu = cpu_seconds() - start
    rows = [{"step": "teacher (RK4, 61 points x 4)", "cpu_seconds": teacher_cpu,
             "wall_seconds": time.perf_counter() - wall, "updates": None,
             "val_init": None, "val_fitted": None, "teacher + fit cpu": None}]  # fmt: skip
    for label, method, order, afs, table in FITS:
        start, wall = cpu_seconds(), time.perf_counter()
        grid = deis.optimize_grid(
            schedule, eps_fn, x_T, method=method, order=order, nfe=args.nfe, afs=afs, t0=1e-3,
            t1=1.0, teacher=teacher, learn_table=table, max_delta=fit.max_delta,
            loss=fit.loss, ld3_settings=settings, fit_dtype=fit.fit_dtype,
        )  # fmt: skip
        cpu = cpu_seconds() - start
        prov = grid.provenance
        rows.append({"step": f"iPNDM-3 {label}", "cpu_seconds": cpu,
                     "wall_seconds": time.perf_counter() - wall,
                     "updates": prov["fit"]["steps_run"], "val_init": prov["val_loss_init"],
                     "val_fitted": prov["val_loss_fitted"],
                     "teacher + fit cpu": teacher_cpu + cpu})  # fmt: skip
        print(rows[-1], flush=True)
    start, wall = cpu_seconds(), time.perf_counter()
    fitted = deis.fit_sampler(schedule, eps_fn, x_T, nfe=args.nfe, t0=1e-3, t1=1.0,
                              teacher=teacher, loss=fit.loss, ld3_settings=settings,
                              max_delta=fit.max_delta, fit_dtype=fit.fit_dtype)  # fmt: skip
    cpu = cpu_seconds() - start
    rows.append({"step": f"fit_sampler auto ({len(fitted.report) - 1} recipes; chose "
                 f"{fitted.recipe})", "cpu_seconds": cpu,
                 "wall_seconds": time.perf_counter() - wall, "updates": None,
                 "val_init": fitted.report[0]["objective"],
                 "val_fitted": min(r["objective"] for r in fitted.report if "objective" in r),
                 "teacher + fit cpu": teacher_cpu + cpu})  # fmt: skip
    print(rows[-1], flush=True)
    dev = jax.devices()[0]
    header = (
        f"# Fitting cost: NFE {args.nfe}, {args.dim}-D {args.mixture} mixture\n\n"
        f"Machine: {dev.platform.upper()}, {os.cpu_count()} cores, jax {jax.__version__}. "
        f"Command: `python scripts/benchmark_fit.py {' '.join(sys.argv[1:])}`. CPU seconds of "
        f"the process (compilation included). Target: the teacher and one fit (iPNDM-3 + LD3 + "
        f"table + AFS) <= 60 CPU seconds. Validation losses: the {fit.loss} objective of "
        f"per-sample distances on the 32 validation starting points.\n\n"
    )
    print(write_results(args.out, rows, header))


if __name__ == "__main__":
    main()
