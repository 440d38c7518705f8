"""Cost of fitting a grid: teacher, GITS, LD3 and LD3 + table on an exact-score mixture.

    python scripts/benchmark_fit.py   # 3072-D, iPNDM-3, NFE 5 -> results/benchmark_fit.md
    python scripts/benchmark_fit.py --dim 64 --method dpmpp2 --nfe 6 --out /tmp/fit64

The target (issue "Learned samplers I"): fitting one grid at NFE 5 for the 3072-D mixture takes
at most 3 minutes on 2 CPU cores, teacher included. Times are wall-clock seconds of one
``optimize_grid`` call each (compilation included, as a user pays it), after one shared
teacher solve (timed separately), in float64, with the fitting settings of
``configs/fit_gmm.py`` (128 starting points, 61 teacher points, 300 LD3 steps at most).
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
from deis_jax.fitting.optimize import optimize_grid  # noqa: E402
from deis_jax.fitting.teacher import solve_teacher  # noqa: E402
from deis_jax.io_utils import atomic_write_text  # noqa: E402
from deis_jax.reporting import markdown_table, write_csv  # noqa: E402
from deis_jax.sampling.method_spec import parse_method_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--method", default="ipndm3")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--out", default="results/benchmark_fit")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    fit = fit_gmm.fit_block()
    schedule = deis.VPSDE.linear()
    eps_fn = deis.GaussianMixture.embedded(args.dim, 8, 8, 3.0, 0.5, seed=0).eps_fn(schedule)
    x_T = schedule.prior_sample(jax.random.PRNGKey(1), (fit.num_fit, args.dim), jax.numpy.float64)
    choice = parse_method_spec(args.method)
    start = time.perf_counter()
    teacher = solve_teacher(schedule, eps_fn, x_T, t0=1e-3, t1=1.0,
                            num_points=fit.teacher_points, grid=fit.teacher_grid,
                            substeps=fit.teacher_substeps, keep_states=True)  # fmt: skip
    rows = [{"step": "teacher (RK4, states kept)", "seconds": time.perf_counter() - start,
             "val_loss_init": None, "val_loss_fitted": None}]  # fmt: skip
    for label, objective, table in (("GITS", "gits", False), ("LD3", "ld3", False),
                                    ("LD3 + table", "ld3", True)):  # fmt: skip
        start = time.perf_counter()
        grid = optimize_grid(
            schedule, eps_fn, x_T, method=choice.method, order=choice.order, nfe=args.nfe,
            objective=objective, t0=1e-3, t1=1.0, options=choice.options, teacher=teacher,
            learn_table=table, max_delta=fit.max_delta, ld3_settings=dict(fit.ld3.to_dict()),
        )  # fmt: skip
        prov = grid.provenance
        rows.append({"step": label, "seconds": time.perf_counter() - start,
                     "val_loss_init": prov["val_loss_init"],
                     "val_loss_fitted": prov["val_loss_fitted"]})  # fmt: skip
        print(rows[-1], flush=True)
    fields = list(rows[0])
    write_csv(args.out + ".csv", rows, fields)
    dev = jax.devices()[0]
    header = (
        f"# Fitting cost: {args.method} at NFE {args.nfe}, {args.dim}-D mixture\n\n"
        f"Machine: {dev.platform.upper()} {dev.device_kind}, {os.cpu_count()} cores, jax "
        f"{jax.__version__}. Command: `python scripts/benchmark_fit.py "
        f"{' '.join(sys.argv[1:])}`. Target: teacher + one fit <= 180 s on 2 CPU cores.\n\n"
    )
    text = header + markdown_table(fields, [[r[f] for f in fields] for r in rows])
    atomic_write_text(args.out + ".md", text)
    print(text)


if __name__ == "__main__":
    main()
