"""Sweeps: a grid over config fields, each point one cell of the experiment engine.

A sweep file is an ordinary config file (``configs/sweeps/gmm_methods.py``): it loads a base
config (:func:`load_config_file`), sets ``mode = "sweep"`` and adds a ``config.sweep`` block
(:func:`sweep_block`):

``sweep.axes``
    a tuple of ``(field, values)``. ``field`` is a dotted config path (``"sampler.nfe"``,
    ``"sde.name"``, ``"sampler.grid"`` ...) and the axes are combined as a Cartesian product,
    in order. A *zipped* axis has a tuple of paths and tuples of values, which move together:
    ``(("sampler.grid", "sampler.t0"), (("quadratic", 1e-3), ("log_snr", 1e-4)))``. The
    virtual field ``"sampler.spec"`` takes method specs (``"tab3"``, ``"rhork:tableau=kutta3"``,
    see :mod:`deis_jax.sampling.method_spec`) and sets ``sampler.method``, ``sampler.order`` and
    ``sampler.options``.
``sweep.evaluator``
    what a point computes (:data:`EVALUATORS`; ``"gmm"``: the Gaussian-mixture cell of
    :mod:`deis_jax.experiments.gmm`, RMSE against the reference solve and the NLL gap to exact
    data, for every ``data.dims``).
``sweep.x``
    the axis on the x axis of the tables and the plot (default ``"sampler.nfe"``).
``sweep.metrics``
    the record fields tabulated in ``sweep.md`` (the first one is plotted in ``sweep.png``).

A point is a cell of :mod:`deis_jax.experiments.engine`: its key is :func:`point_key` (the
overrides as JSON), the experiment's fingerprint is :func:`sweep_fingerprint` (the base config
and the evaluator), and its record is ``{"overrides", "records", "seconds"}``, appended to
``<workdir>/sweep.jsonl``. :func:`write_summary` writes ``sweep.csv``, ``sweep.md`` and
``sweep.png`` from the records.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections
from absl import logging

from deis_jax.common import checks as cv
from deis_jax.common.files import atomic_write_text
from deis_jax.common.identity import fingerprint
from deis_jax.common.reporting import markdown_table, pivot, plot_metric_vs_nfe, write_csv
from deis_jax.experiments import gmm
from deis_jax.experiments.engine import FAILED
from deis_jax.sampling.method_spec import parse_method_spec

RESULTS_FILE = "sweep.jsonl"
SPEC_FIELD = "sampler.spec"
Point = tuple[dict[str, Any], ml_collections.ConfigDict]  # (overrides, the point's config)


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


def plain(overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with tuples as lists (how they read back from JSON)."""

    def convert(value):
        return [convert(v) for v in value] if isinstance(value, tuple | list) else value

    return {k: convert(v) for k, v in overrides.items()}


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


def grid_points(config) -> list[Point]:
    """Check ``config.sweep.axes`` and return every point as ``(overrides, config)``."""
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
    return [(overrides, apply_overrides(config, overrides)) for overrides in expand_axes(axes)]


def point_key(overrides: dict[str, Any]) -> str:
    """A point's cell key: its overrides as JSON (keys sorted)."""
    return json.dumps(plain(overrides), sort_keys=True)


def point_label(overrides: dict[str, Any], x: str) -> str:
    """A point's row label in the tables: its overrides except ``x``."""
    parts = []
    for path, value in overrides.items():
        if path == x:
            continue
        parts.append(str(value) if path == SPEC_FIELD else f"{path.split('.')[-1]}={value}")
    return ", ".join(parts) or "all"


def sweep_fingerprint(config) -> str:
    """The engine fingerprint of a sweep: the base config (without ``mode`` and the
    ``sweep`` block) and the evaluator. With a point's key it fixes the point's config."""
    values = config.to_dict()
    values.pop("mode", None)
    sweep = values.pop("sweep", {})
    return fingerprint({"config": values, "evaluator": sweep.get("evaluator")})


# --- evaluators ----------------------------------------------------------------------------

# name -> (validate(point_config), evaluate(point_config, context) -> list of record dicts)
EVALUATORS: dict[str, tuple[Callable, Callable]] = {}


def register_evaluator(name: str, validate: Callable, evaluate: Callable) -> None:
    """Add a per-point evaluation. ``validate(config)`` raises ``ConfigError``;
    ``evaluate(config, context)`` returns a list of flat JSON-able dicts (one per row of the
    summary); ``context`` is a dict shared by all points of one run (for caches) holding
    ``mesh``."""
    EVALUATORS[name] = (validate, evaluate)


register_evaluator("gmm", gmm.validate_problem, gmm.evaluate_point)


# --- summary -------------------------------------------------------------------------------


def check_finite(record: dict) -> dict:
    """An evaluator record with every non-finite number replaced by None and, if there was
    one, a ``failed`` reason naming the fields (e.g. ``"dim 2: non-finite rmse"``): a NaN is
    never tabulated as a result."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    where = f"dim {record['dim']}: " if "dim" in record else ""
    return {**record, **dict.fromkeys(bad), FAILED: f"{where}non-finite {', '.join(bad)}"}


def csv_fields(rows: list[dict], axis_fields: list[str], metrics: Sequence[str]) -> list[str]:
    """The columns of ``sweep.csv`` in a defined order (never the order of a record's keys,
    which differs between a computed and a cached record): the axes, ``dim`` and ``nfe``, the
    metrics, then every other field sorted."""
    present = {k for r in rows for k in r}
    leading = [k for k in dict.fromkeys([*axis_fields, "dim", "nfe", *metrics]) if k in present]
    return leading + sorted(present - set(leading))


def summary_rows(records: Iterable[dict]) -> list[dict]:
    """One flat row per evaluator record: the point's overrides, then the record's fields."""
    return [{**point["overrides"], **row} for point in records for row in point["records"]]


def write_summary(
    workdir: str, rows: list[dict], overrides: list[dict], x: str, metrics: Sequence[str]
) -> None:
    """``sweep.csv`` (every row, columns :func:`csv_fields`), ``sweep.md`` (metric tables: point
    label x ``x``, one per metric and ``dim``; a failed row reads "failed") and ``sweep.png``
    (first metric vs spent NFE)."""
    axis_fields = list(dict.fromkeys(k for o in overrides for k in o))
    write_csv(os.path.join(workdir, "sweep.csv"), rows, csv_fields(rows, axis_fields, metrics))
    rows = [
        {**r, "_label": point_label({k: r[k] for k in axis_fields if k in r}, x), "_x": r.get(x)}
        for r in rows
    ]
    labels = list(dict.fromkeys(r["_label"] for r in rows))
    xs = list(dict.fromkeys(r["_x"] for r in rows))
    groups = list(dict.fromkeys(r.get("dim") for r in rows))
    sections = [f"# Sweep: {len(overrides)} points ({', '.join(axis_fields)})\n"]
    panels = []
    for group in groups:
        recs = [r for r in rows if r.get("dim") == group]
        title = f"dim {group}" if group is not None else "all"
        for metric in metrics:
            if all(r.get(metric) is None and not r.get(FAILED) for r in recs):
                continue
            row_labels, cols, cells = pivot(
                recs, "_label", "_x", lambda r, m=metric: "failed" if r.get(FAILED) else r.get(m),
                labels, xs,
            )  # fmt: skip
            header = [f"{metric} ({title}) \\ {x}"] + [str(c) for c in cols]
            body = [[a] + c for a, c in zip(row_labels, cells, strict=True)]
            sections.append(f"## {metric}, {title}\n\n" + markdown_table(header, body))
        curves = {}
        for label in labels if metrics else ():
            pts = [(r.get("nfe", r["_x"]), r.get(metrics[0])) for r in recs if r["_label"] == label]
            if any(v is not None for _, v in pts) and all(
                isinstance(p, int | float) for p, _ in pts
            ):
                curves[label] = ([p for p, _ in pts], [v for _, v in pts])
        if curves:
            panels.append((title, curves))
    atomic_write_text(os.path.join(workdir, "sweep.md"), "\n".join(sections))
    if panels:
        plot_metric_vs_nfe(panels, os.path.join(workdir, "sweep.png"), metrics[0])
    print("\n".join(sections))
    logging.info("wrote %s/{sweep.jsonl,sweep.csv,sweep.md,sweep.png}", workdir)
