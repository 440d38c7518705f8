"""``--mode=table``: reproduce a paper's sampler table -- every method x NFE, FID or FD-digits.

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=table \
        --config.table=deis_cifar10

(with ``configs/tables.py``'s fields in the config; ``--config=configs/tables.py:vpsde_digits``
adds them to any experiment config). ``config.table`` names a registered table of
``deis_jax.experiments.tables`` (``deis_cifar10``: the DEIS variants; ``ipndm_ersde_dpmpp``:
the training-free peers and ER-SDE-Solver-3). Runge-Kutta rows round up to whole steps; the
real NFE is shown as a "+k" superscript, as in the paper.

Every cell draws ``config.eval.num_samples`` images from the same x_T and scores them
(``deis_jax.experiments.scoring``): the Frechet distance against the reference statistics of
the data (or a given stats file); optionally Inception Score / its digits analogue, KID, and
the RMSE against a reference ODE solve on the first ``rmse_num_samples`` x_T.

The cells run through the experiment engine (``deis_jax.experiments.engine``): each finished
cell is appended to ``<workdir>/tables/<table>/cells.jsonl`` under a fingerprint of everything
that affects it (model and weights, SDE, sampler base settings, eval settings, extractor
weights), so a re-run skips finished cells and a killed run resumes. ``table.md`` (ours and the
paper's numbers side by side) and ``table.csv`` are rewritten after every cell,
``metric_vs_nfe.png`` (log-log) at the end, and all three are copied to
``<config.eval.export>.{md,csv,png}`` when set.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
from absl import logging

from deis_jax import config_validation as cv
from deis_jax.evaluation import features
from deis_jax.experiments import engine
from deis_jax.experiments import tables as tb
from deis_jax.experiments.scoring import SampleScorer
from deis_jax.models.loading import (
    PARAMS_SOURCES,
    describe_model,
    load_model,
    validate_model_and_data,
)
from deis_jax.sampling.sde import NoiseSchedule


class Plan(NamedTuple):
    """What :func:`validate` built: the schedule, the table, its rows and NFEs, one engine cell
    per (row, NFE) with the cell's sampler (network not yet bound) as payload."""

    schedule: NoiseSchedule
    spec: tb.TableSpec
    rows: list[tb.TableRow]
    nfes: list[int]
    cells: list[engine.Cell]


def _rows(config, spec: tb.TableSpec) -> list[tb.TableRow]:
    wanted = cv.get_field(config, "eval.methods")
    try:
        return spec.select(wanted)
    except ValueError as err:
        raise cv.ConfigError(f"config.eval.methods {err}") from None


def validate(config) -> Plan:
    """Check every field the table reads and build every cell's sampler."""
    schedule = cv.validate_sde(config)
    cv.validate_sampler(config, schedule)
    validate_model_and_data(config)
    if "eval" not in config or "table" not in config:
        raise cv.ConfigError(
            "config.table / config.eval are missing: add them with configs/tables.py's "
            "add_table_fields(config), or run with --config=configs/tables.py:<experiment "
            "config name>"
        )
    spec = tb.TABLES[cv.require_choice(config, "table", tuple(tb.TABLES))]
    features.validate_eval(config)
    cv.require_choice(config, "eval.params", PARAMS_SOURCES)
    rows = _rows(config, spec)
    nfes = spec.nfes
    if cv.get_field(config, "eval.nfes") is not None:
        nfes = cv.require_int_list(config, "eval.nfes", minimum=1)
    cells, n = [], int(config.eval.num_samples)
    for row in rows:
        for nfe in nfes:
            try:
                sampler = row.sampler(config.sampler, schedule, nfe)
            except ValueError as err:
                raise cv.ConfigError(
                    f"table {spec.name!r} row {row.label!r} ({row.spec}) at NFE {nfe}: {err}"
                ) from None
            key, label = tb.cell_key(row, nfe), f"{row.label} NFE {nfe}"
            cells.append(engine.Cell(key, sampler.nfe * n, label, (row, nfe, sampler)))
    return Plan(schedule, spec, rows, list(nfes), cells)


def run(config, workdir: str, plan: Plan | None = None, *, model=None, extractor=None):
    """Run (or resume) the table; returns the records in table order (process 0; [] on the
    others). ``model`` (a ``deis_jax.models.loading.LoadedModel``) / ``extractor`` replace
    the config's (tests use an analytic eps and a small extractor)."""
    plan = validate(config) if plan is None else plan
    spec, ev = plan.spec, config.eval
    out_dir = os.path.join(workdir, "tables", spec.name)
    os.makedirs(out_dir, exist_ok=True)
    if model is None:
        model = load_model(config, workdir, plan.schedule, params=ev.params)
    extractor = features.extractor_from_config(config) if extractor is None else extractor
    fingerprint = engine.fingerprint(tb.fingerprint_payload(config, model.identity, extractor))
    reference = features.Reference(config, workdir, extractor)
    scorer = SampleScorer(config, plan.schedule, model, extractor, reference)
    logging.info(
        "table %s: %d cells (%d samples each, metric %s)",
        spec.name, len(plan.cells), ev.num_samples, ev.metric,
    )  # fmt: skip

    def compute(cell: engine.Cell, advance: engine.Progress) -> dict:
        row, nfe, sampler = cell.payload
        record = {
            "table": spec.name, "method": row.label, "spec": row.spec,
            "grid": row.grid(config.sampler), "nfe_budget": nfe, "nfe": sampler.nfe,
            "metric": features.METRIC_LABEL[ev.metric], **scorer.score(sampler, advance),
        }  # fmt: skip
        logging.info(
            "%s NFE %d (spent %d): %s %.4g  [%.1f s]",
            row.label, nfe, sampler.nfe, record["metric"], record["value"], record["seconds"],
        )  # fmt: skip
        return record

    def report(done: dict, plot: bool = False) -> list[dict]:
        t0, t1 = plan.schedule.interval(config.sampler.t0, config.sampler.t1)
        ctx = tb.ReportContext(
            features.METRIC_LABEL[ev.metric], int(ev.num_samples),
            f"{extractor.name} (weights sha256 {extractor.weights_sha256[:12]}…)",
            reference.get().get("source"), config.sde.name, t0, t1, config.sampler.grid,
            fingerprint, describe_model(model.identity), spec.notes,
            int(ev.rmse_reference_steps) if ev.rmse else None,
        )  # fmt: skip
        return tb.write_report(out_dir, spec, plan.rows, plan.nfes, done, ctx, plot=plot)

    done = engine.run_cells(
        plan.cells, compute, cache_path=os.path.join(out_dir, "cells.jsonl"),
        fingerprint=fingerprint, desc=f"table {spec.name}", unit="eval", on_record=report,
    )  # fmt: skip
    if jax.process_index() != 0:
        return []
    records = report(done, plot=True)
    if ev.get("export"):
        tb.export_report(out_dir, ev.export)
        logging.info("exported %s.{md,csv,png}", ev.export)
    return records
