"""``--mode=sweep``: run a grid over config fields, resumably, and summarise it.

    python main.py --config=configs/sweeps/gmm_methods.py --workdir=runs/sweep_gmm_methods

A sweep file is an ordinary config file with a ``config.sweep`` block: the axes (dotted config
paths, combined as a product or zipped; ``sampler.spec`` takes method specs), the evaluator
(what a point computes, e.g. ``"gmm"``), the x axis and the metrics of the summary. The format
is described in :mod:`deis_jax.experiments.sweep.cells`.

Every point is validated at start-up (a bad value names the point and the field). Each point
is a cell of the experiment engine (:mod:`deis_jax.experiments.engine`, lines sealed and
checked on resume by :mod:`deis_jax.experiments.engine`): a finished point is appended
as one JSON line to ``<workdir>/sweep.jsonl`` (a line cut short by a kill or damaged is named
in the log and its point computed again), and a restart skips every point already there under
the same base config and evaluator. A point with a non-finite metric is a failure: shown as
"failed" in the tables, computed again by the next run. At the end ``sweep.csv``, ``sweep.md``
and ``sweep.png`` are written atomically.

Several devices: each point's samples are sharded over a ``('data',)`` mesh of all devices
(:mod:`deis_jax.common.parallel`). Several processes (TPU pod, SLURM): every process runs every
point in the same order (SPMD); process 0 decides which points are finished (broadcast to the
others) and alone writes the results.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
from absl import logging

from deis_jax.common import checks as cv
from deis_jax.common import parallel
from deis_jax.experiments.engine import FAILED, Cell, Progress, run_cells
from deis_jax.experiments.sweep import cells as sw


class Plan(NamedTuple):
    """What :func:`validate` built: the points, one engine cell per point, the fingerprint."""

    points: list[sw.Point]
    evaluator: str
    x: str
    cells: list[Cell]
    fingerprint: str


def validate(config) -> Plan:
    """Check the sweep block and every point's config (before any work)."""
    evaluator = cv.require_choice(config, "sweep.evaluator", tuple(sw.EVALUATORS))
    points = sw.grid_points(config)
    x = config.sweep.get("x") or "sampler.nfe"
    if x not in points[0][0]:
        logging.info("sweep.x=%s is not a sweep axis; tables use it as a constant", x)
    keys = [sw.point_key(overrides) for overrides, _ in points]
    if len(set(keys)) != len(keys):
        raise cv.ConfigError("config.sweep.axes: the grid has duplicate points")
    check = sw.EVALUATORS[evaluator][0]
    for key, (_, point_config) in zip(keys, points, strict=True):
        try:
            check(point_config)
        except cv.ConfigError as err:
            raise cv.ConfigError(f"sweep point {key}: {err}") from None
    cells = [
        Cell(key, label=sw.point_label(point[0], ""), payload=point)
        for key, point in zip(keys, points, strict=True)
    ]
    return Plan(points, evaluator, x, cells, sw.sweep_fingerprint(config))


def check_inputs(config, workdir: str, plan: Plan) -> None:
    """The files this mode reads: none (the problem is analytic)."""


def run(config, workdir: str, plan: Plan | None = None, *, progress: bool = True) -> list[dict]:
    """Run (or resume) the sweep; returns the summary rows (process 0; the others: [])."""
    plan = validate(config) if plan is None else plan
    if any(p.get("compare", {}).get("x64", False) for _, p in plan.points):
        jax.config.update("jax_enable_x64", True)
    evaluate = sw.EVALUATORS[plan.evaluator][1]
    context = {"mesh": parallel.make_mesh()}

    def compute(cell: Cell, advance: Progress) -> dict:
        overrides, point_config = cell.payload
        start = time.perf_counter()
        records = [sw.check_finite(r) for r in evaluate(point_config, context)]
        seconds = time.perf_counter() - start
        record = {"overrides": sw.plain(overrides), "records": records, "seconds": seconds}
        failed = [r[FAILED] for r in records if r.get(FAILED)]
        if failed:
            logging.warning("sweep point %s failed: %s", cell.key, "; ".join(failed))
            record[FAILED] = "; ".join(failed)
        return record

    os.makedirs(workdir, exist_ok=True)
    records = run_cells(
        plan.cells, compute, cache_path=os.path.join(workdir, sw.RESULTS_FILE),
        fingerprint=plan.fingerprint, desc="sweep (points)", progress=progress,
    )  # fmt: skip
    if jax.process_index() != 0:
        return []
    rows = sw.summary_rows(records.values())
    overrides = [o for o, _ in plan.points]
    sw.write_summary(workdir, rows, overrides, plan.x, tuple(config.sweep.metrics))
    return rows
