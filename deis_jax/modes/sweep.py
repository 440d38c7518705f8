"""``--mode=sweep``: run a grid over config fields, resumably, and summarise it.

    python main.py --config=configs/sweeps/gmm_methods.py --workdir=runs/sweep_gmm_methods

A sweep file is an ordinary config file: it loads a base config (:func:`load_config_file`),
sets ``mode = "sweep"`` and adds a ``config.sweep`` block (:func:`sweep_block`):

``sweep.axes``
    a tuple of ``(field, values)``. ``field`` is a dotted config path (``"sampler.nfe"``,
    ``"sde.name"``, ``"sampler.grid"`` ...) and the axes are combined as a Cartesian product,
    in order. A *zipped* axis has a tuple of paths and tuples of values, which move together:
    ``(("sampler.grid", "sampler.t0"), (("quadratic", 1e-3), ("log_snr", 1e-4)))``. The
    virtual field ``"sampler.spec"`` takes method specs (``"tab3"``, ``"rhork:tableau=kutta3"``,
    see :mod:`deis_jax.sampling.method_spec`) and sets ``sampler.method``, ``sampler.order`` and
    ``sampler.options``.
``sweep.evaluator``
    what a point computes (:data:`EVALUATORS`; ``"gmm"``: the embedded job's per-cell metrics,
    RMSE against the reference solve and the NLL gap to exact data, for every ``data.dims``).
``sweep.x``
    the axis on the x axis of the tables and the plot (default ``"sampler.nfe"``).

Every point is validated at start-up (a bad value names the point and the field). Each
finished point is appended as one JSON line to ``<workdir>/sweep.jsonl`` (one fsync'ed write;
a line cut short by a kill is ignored); a restart skips every point already there with the same
config fingerprint. At the end ``sweep.csv``, ``sweep.md`` and ``sweep.png`` are written
atomically.

Several devices: each point's samples are sharded over a ``('data',)`` mesh of all devices
(:mod:`deis_jax.parallel`). Several processes (TPU pod, SLURM): every process runs every point
in the same order (SPMD); process 0 decides which points are finished (broadcast to the
others) and alone writes the results.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from deis_jax import build, parallel
from deis_jax import config_validation as cv
from deis_jax.io_utils import append_jsonl, atomic_write_text, read_jsonl
from deis_jax.reporting import markdown_table, pivot, plot_metric_vs_nfe, write_csv
from deis_jax.sampling.method_spec import parse_method_spec

RESULTS_FILE = "sweep.jsonl"
SPEC_FIELD = "sampler.spec"


# --- sweep files ---------------------------------------------------------------------------


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file at ``path`` (how a sweep file loads its base)."""
    path = os.path.abspath(path)
    spec = importlib.util.spec_from_file_location(f"_deis_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def sweep_block(
    axes: Sequence[tuple],
    *,
    evaluator: str = "gmm",
    x: str = "sampler.nfe",
    metrics: Sequence[str] = ("rmse", "nll_gap"),
) -> ml_collections.ConfigDict:
    """The ``config.sweep`` block (see the module docstring)."""
    block = ml_collections.ConfigDict()
    block.axes = tuple((field, tuple(values)) for field, values in axes)
    block.evaluator = evaluator
    block.x = x
    block.metrics = tuple(metrics)
    return block


def _paths(field) -> tuple[str, ...]:
    return (field,) if isinstance(field, str) else tuple(field)


def expand_axes(axes: Sequence[tuple]) -> list[dict[str, Any]]:
    """Every point of the grid as ``{path: value}`` (product of the axes, zipped within)."""
    options = []
    for field, values in axes:
        paths = _paths(field)
        if len(paths) == 1:
            options.append([{paths[0]: v} for v in values])
        else:
            options.append([dict(zip(paths, v, strict=True)) for v in values])
    points = []
    for combo in itertools.product(*options):
        point: dict[str, Any] = {}
        for part in combo:
            point.update(part)
        points.append(point)
    return points


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def apply_overrides(config, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``overrides`` (dotted paths) set; unknown fields and wrong
    types are ``ConfigError``\\ s."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    for path, value in overrides.items():
        if path == SPEC_FIELD:
            try:
                choice = parse_method_spec(value)
            except (ValueError, TypeError) as err:
                raise cv.ConfigError(f"{SPEC_FIELD}={value!r}: {err}") from None
            cfg.sampler.method = choice.method
            cfg.sampler.order = choice.order
            cfg.sampler.options = ml_collections.ConfigDict(dict(choice.options))
            continue
        *parents, leaf = path.split(".")
        node = cfg
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise cv.ConfigError(f"sweep field {path!r}: config.{path} does not exist")
            node = node[part]
        if leaf not in node:
            raise cv.ConfigError(f"sweep field {path!r}: config.{path} does not exist")
        try:
            node[leaf] = value
        except TypeError as err:
            raise cv.ConfigError(f"sweep field {path!r} = {value!r}: {err}") from None
    return cfg


def point_key(overrides: dict[str, Any]) -> str:
    return json.dumps({k: _plain(v) for k, v in overrides.items()}, sort_keys=True)


def config_fingerprint(config) -> str:
    """Hash of a point's full config (without the ``sweep`` block and ``mode``)."""
    values = config.to_dict()
    values.pop("sweep", None)
    values.pop("mode", None)
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def point_label(overrides: dict[str, Any], x: str) -> str:
    parts = []
    for path, value in overrides.items():
        if path == x:
            continue
        parts.append(str(value) if path == SPEC_FIELD else f"{path.split('.')[-1]}={value}")
    return ", ".join(parts) or "all"


# --- evaluators ----------------------------------------------------------------------------

# name -> (validate(point_config), evaluate(point_config, context) -> list of record dicts)
EVALUATORS: dict[str, tuple[Callable, Callable]] = {}


def register_evaluator(name: str, validate: Callable, evaluate: Callable) -> None:
    """Add a per-point evaluation. ``evaluate(config, context)`` returns a list of flat
    JSON-able dicts (one per row of the summary); ``context`` is a dict shared by all points
    of one run (for caches) holding ``mesh``."""
    EVALUATORS[name] = (validate, evaluate)


def _validate_gmm(config) -> None:
    from deis_jax.modes.compare import validate_problem

    validate_problem(config)


def _evaluate_gmm(config, context: dict) -> list[dict]:
    """The embedded job's cell: the same problem as ``--mode=compare`` (``gmm_problem``: same
    mixture, x_T, data draws and reference), one sampler from ``config.sampler``; samples
    sharded over ``context['mesh']``. References are cached across points."""
    from deis_jax.modes.compare import cell_metrics, gmm_problem, sampling_interval

    dtype = jax.numpy.float64 if config.compare.get("x64", False) else jax.numpy.float32
    schedule = build.schedule_from_config(config.sde)
    mesh = context["mesh"]
    n = config.compare.num_samples
    records = []
    for dim in config.data.dims:
        ref_key = json.dumps(
            [config.sde.to_dict(), config.data.to_dict(), config.seed, dim, n,
             sampling_interval(config, schedule), config.compare.reference_steps, str(dtype)],
            sort_keys=True, default=str,
        )  # fmt: skip
        problems = context.setdefault("problems", {})
        if ref_key not in problems:
            problems[ref_key] = gmm_problem(config, dim, schedule, dtype)
        problem = problems[ref_key]
        sampler = build.sampler_from_config(config.sampler, schedule, problem.eps_fn)
        start = time.perf_counter()
        padded, _ = parallel.pad_batch(problem.x_T, mesh.size)
        out = parallel.shard_sampler(sampler, mesh)(
            parallel.shard_batch(padded, mesh), problem.noise_key, 0
        )
        out = parallel.gather(out)[:n].astype(np.float64)
        seconds = time.perf_counter() - start
        records.append(
            {
                "dim": int(dim),
                "nfe": int(sampler.nfe),
                **cell_metrics(problem, sampler, out),
                "reference_error": float(problem.reference.error_estimate),
                "seconds": seconds,
            }
        )
    return records


register_evaluator("gmm", _validate_gmm, _evaluate_gmm)


# --- the mode ------------------------------------------------------------------------------


def _points(config) -> list[tuple[dict[str, Any], ml_collections.ConfigDict]]:
    axes = cv.get_field(config, "sweep.axes")
    if isinstance(axes, str) or not axes:
        raise cv.ConfigError(
            f"config.sweep.axes must be a non-empty tuple of (field, values), got {axes!r}"
        )
    for axis in axes:
        if not (isinstance(axis, tuple | list) and len(axis) == 2):
            raise cv.ConfigError(f"config.sweep.axes: each axis is (field, values), got {axis!r}")
        field, values = axis
        paths = _paths(field)
        if isinstance(values, str) or not values:
            raise cv.ConfigError(
                f"config.sweep.axes: values of {field!r} must be a non-empty tuple"
            )
        if len(paths) > 1 and any(
            not isinstance(v, tuple | list) or len(v) != len(paths) for v in values
        ):
            raise cv.ConfigError(
                f"config.sweep.axes: zipped axis {paths} needs values that are tuples of "
                f"{len(paths)}, got {values!r}"
            )
    points = []
    for overrides in expand_axes(axes):
        points.append((overrides, apply_overrides(config, overrides)))
    return points


def validate(config) -> list[tuple[dict[str, Any], ml_collections.ConfigDict]]:
    """Check the sweep block and every point's config; returns ``[(overrides, config)]``."""
    evaluator = cv.require_choice(config, "sweep.evaluator", tuple(EVALUATORS))
    points = _points(config)
    x = config.sweep.get("x") or "sampler.nfe"
    if x not in points[0][0]:
        logging.info("sweep.x=%s is not a sweep axis; tables use it as a constant", x)
    keys = [point_key(o) for o, _ in points]
    if len(set(keys)) != len(keys):
        raise cv.ConfigError("config.sweep.axes: the grid has duplicate points")
    check = EVALUATORS[evaluator][0]
    for overrides, point_config in points:
        try:
            check(point_config)
        except cv.ConfigError as err:
            raise cv.ConfigError(f"sweep point {point_key(overrides)}: {err}") from None
    return points


def run_sweep(config, workdir: str, *, progress: bool = True) -> list[dict]:
    """Run (or resume) the sweep; returns the summary rows (process 0; others: [])."""
    parallel.maybe_initialize_distributed()
    points = validate(config)
    evaluate = EVALUATORS[config.sweep.evaluator][1]
    x = config.sweep.get("x") or "sampler.nfe"
    if any(p.compare.get("x64", False) for _, p in points if "compare" in p):
        jax.config.update("jax_enable_x64", True)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    results_path = os.path.join(workdir, RESULTS_FILE)

    keys = [point_key(o) for o, _ in points]
    prints = [config_fingerprint(p) for _, p in points]
    done = {}
    if is_main:
        for line in read_jsonl(results_path):
            done[(line.get("key"), line.get("fingerprint"))] = line
    finished = np.array([(k, f) in done for k, f in zip(keys, prints, strict=True)], np.int32)
    finished = parallel.broadcast_from_process_0(finished).astype(bool)

    context = {"mesh": parallel.make_mesh()}
    bar = None
    if progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=len(points), initial=int(finished.sum()), desc="sweep", unit="point")
    lines = []
    for i, (overrides, point_config) in enumerate(points):
        if finished[i]:
            if is_main:
                lines.append(done[(keys[i], prints[i])])
            continue
        if bar is not None:
            bar.set_postfix_str(point_label(overrides, "") or keys[i])
        start = time.perf_counter()
        records = evaluate(point_config, context)
        line = {
            "key": keys[i],
            "fingerprint": prints[i],
            "overrides": {k: _plain(v) for k, v in overrides.items()},
            "records": records,
            "seconds": time.perf_counter() - start,
        }
        if is_main:
            append_jsonl(results_path, line)
            lines.append(line)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not is_main:
        return []
    rows = summary_rows(lines)
    write_summary(workdir, rows, [o for o, _ in points], x, tuple(config.sweep.metrics))
    return rows


def summary_rows(lines: Sequence[dict]) -> list[dict]:
    """One flat row per record: the point's overrides, then the record's fields."""
    rows = []
    for line in lines:
        for record in line["records"]:
            rows.append({**line["overrides"], **record})
    return rows


def write_summary(
    workdir: str, rows: list[dict], overrides: list[dict], x: str, metrics: Sequence[str]
) -> None:
    """``sweep.csv`` (every row), ``sweep.md`` (metric tables: point label x ``x``, one per
    metric and ``dim``) and ``sweep.png`` (first metric vs spent NFE)."""
    axis_fields = list(dict.fromkeys(k for o in overrides for k in o))
    record_fields = list(dict.fromkeys(k for r in rows for k in r if k not in axis_fields))
    write_csv(os.path.join(workdir, "sweep.csv"), rows, axis_fields + record_fields)
    for row in rows:
        row["_label"] = point_label({k: row[k] for k in axis_fields if k in row}, x)
        row["_x"] = row.get(x)
    labels = list(dict.fromkeys(r["_label"] for r in rows))
    xs = list(dict.fromkeys(r["_x"] for r in rows))
    groups = list(dict.fromkeys(r.get("dim") for r in rows))
    sections = [f"# Sweep: {len(overrides)} points ({', '.join(axis_fields)})\n"]
    panels = []
    for group in groups:
        recs = [r for r in rows if r.get("dim") == group]
        title = f"dim {group}" if group is not None else "all"
        for metric in metrics:
            if all(r.get(metric) is None for r in recs):
                continue
            row_labels, cols, cells = pivot(
                recs, "_label", "_x", lambda r, m=metric: r.get(m), labels, xs
            )
            header = [f"{metric} ({title}) \\ {x}"] + [str(c) for c in cols]
            body = [[a] + c for a, c in zip(row_labels, cells, strict=True)]
            sections.append(f"## {metric}, {title}\n\n" + markdown_table(header, body))
        if metrics:
            curves = {}
            for label in labels:
                pts = [
                    (r.get("nfe", r["_x"]), r.get(metrics[0])) for r in recs if r["_label"] == label
                ]
                if any(v is not None for _, v in pts) and all(
                    isinstance(p, int | float) for p, _ in pts
                ):
                    curves[label] = ([p for p, _ in pts], [v for _, v in pts])
            if curves:
                panels.append((title, curves))
    atomic_write_text(os.path.join(workdir, "sweep.md"), "\n".join(sections))
    if panels:
        plot_metric_vs_nfe(panels, os.path.join(workdir, "sweep.png"), metrics[0])
    for row in rows:
        row.pop("_label", None)
        row.pop("_x", None)
    print("\n".join(sections))
    logging.info("wrote %s/{sweep.jsonl,sweep.csv,sweep.md,sweep.png}", workdir)


def run(config, workdir: str) -> None:
    run_sweep(config, workdir)
