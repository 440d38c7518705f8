"""``--mode=table``: reproduce a paper's sampler table -- every method x NFE, FID or FD-digits.

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=table \
        --config.table=deis_cifar10

(with ``configs/tables.py``'s fields in the config; ``--config=configs/tables.py:vpsde_digits``
adds them to any experiment config). ``config.table`` names a registered table of
``deis_jax.experiments.table.cells`` (``deis_cifar10``: the DEIS variants; ``ipndm_ersde_dpmpp``:
the training-free peers and ER-SDE-Solver-3; ``amed_cifar10``: the AMED paper's table).
Runge-Kutta rows round up to whole steps; the real NFE is shown as a "+k" superscript, as in
the paper.

AMED rows sample with trained predictors: ``config.eval.amed_predictors`` names the directory
of the files ``--mode=fit`` writes (``<workdir>/grids/<problem>/<label>_nfe<n>_amed.json``).
Every needed file must be there and match its row (method, options, NFE, AFS, interval, time
grid) -- checked before any sampling; the file's sha256 is in its cells' cache keys. Without
the field the AMED rows are not run and the table's notes say so.

Every cell draws ``config.eval.num_samples`` images from the same x_T and scores them
(``deis_jax.experiments.scoring``): the Frechet distance against the reference statistics of
the data (or a given stats file); optionally Inception Score / its digits analogue, KID, and
the RMSE against a reference ODE solve on the first ``rmse_num_samples`` x_T.

The cells run through the experiment engine (``deis_jax.experiments.engine``, with sealed
lines: ``deis_jax.experiments.engine``): each finished cell is appended to
``<workdir>/tables/<table>/cells.jsonl`` under a fingerprint of everything that affects it
(model and weights, SDE, sampler base settings, eval settings, extractor weights), so a re-run
skips finished cells and a killed run resumes; a damaged line is named in the log and its cell
computed again. A cell whose samples are not all finite is shown as failed (with how many),
never as a number, and is computed again by the next run. A damaged reference-statistics cache
(``<workdir>/tables/reference_*.npz``) is moved aside and rebuilt; a damaged
``config.eval.reference_stats`` file is refused, naming it. ``table.md`` (ours and the
paper's numbers side by side) and ``table.csv`` are rewritten after every cell,
``metric_vs_nfe.png`` (log-log) at the end, and all three are copied to
``<config.eval.export>.{md,csv,png}`` when set.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
from absl import logging

from deis_jax.common import checks as cv
from deis_jax.common import identity
from deis_jax.common.files import sha256_file
from deis_jax.evaluation import features
from deis_jax.experiments import engine, validation
from deis_jax.experiments.engine import FAILED, run_cells
from deis_jax.experiments.scoring import SampleScorer, check_reference
from deis_jax.experiments.table import cells as tb
from deis_jax.models.loading import (
    PARAMS_SOURCES,
    describe_model,
    load_model,
    validate_model_and_data,
    verify_sampling_params,
)
from deis_jax.sampling.sde import NoiseSchedule


class Plan(NamedTuple):
    """What :func:`validate` built: the schedule, the table, its rows and NFEs, one engine cell
    per (row, NFE) with ``(row, nfe, sampler, predictor)`` as payload (the sampler's network
    not yet bound; ``predictor``: ``(path, sha256)`` of an AMED row's file, else None), and the
    notes printed under the table."""

    schedule: NoiseSchedule
    spec: tb.TableSpec
    rows: list[tb.TableRow]
    nfes: list[int]
    cells: list[engine.Cell]
    notes: str = ""


TRAIN_HINT = (
    "train predictors with --mode=fit, configs/amed_digits.py, then pass "
    "--config.eval.amed_predictors=<dir>"
)


def _rows(config, spec: tb.TableSpec) -> list[tb.TableRow]:
    wanted = cv.get_field(config, "eval.methods")
    try:
        return spec.select(wanted)
    except ValueError as err:
        raise cv.ConfigError(f"config.eval.methods {err}") from None


def _predictor_dir(config) -> str | None:
    value = config.eval.get("amed_predictors")
    if value is not None and (not isinstance(value, str) or not value):
        raise cv.ConfigError(
            f"config.eval.amed_predictors must be a directory (str) or None, got {value!r}"
        )
    return value


def _check_predictor_files(directory: str, rows, nfes, grids: str) -> None:
    """Every AMED cell's file must exist: one error naming all missing ones."""
    missing = [
        row.predictor_path(directory, nfe)
        for row in rows
        if row.needs_predictor
        for nfe in nfes
        if not os.path.isfile(row.predictor_path(directory, nfe))
    ]
    if missing:
        where = "" if os.path.isdir(directory) else f" (directory {directory} does not exist)"
        raise cv.ConfigError(
            f"config.eval.amed_predictors: {len(missing)} AMED predictor file(s) missing"
            f"{where}: {', '.join(missing)}; {TRAIN_HINT} (the fit's <workdir>/grids/"
            f"<problem>, trained for these methods and NFEs on the rows' grids, "
            f"--config.sampler.grid: {grids})"
        )


def validate(config) -> Plan:
    """Check every field the table reads and build every cell's sampler."""
    schedule = validation.validate_sde(config)
    validation.validate_sampler(config, schedule)
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
        for budget in sorted({row.budget for row in rows}):
            nfes = validation.require_nfe_list(
                config, "eval.nfes", [row.choice for row in rows if row.budget == budget],
                rounding=tb.NFE_ROUNDING, parallel=budget == "parallel_nfe")  # fmt: skip
    directory = _predictor_dir(config)
    amed_rows = [row.label for row in rows if row.needs_predictor]
    grids = ", ".join(f"{r.label} {r.grid(config.sampler)!r}" for r in rows if r.needs_predictor)
    notes = spec.notes
    if amed_rows and directory is None:
        notes += (
            f" The AMED rows ({', '.join(amed_rows)}) were not run: they need trained "
            f"predictors (config.eval.amed_predictors is None); {TRAIN_HINT} (trained on "
            f"the rows' grids, --config.sampler.grid: {grids})."
        )
        logging.warning("table %s: AMED rows %s not run (no config.eval.amed_predictors)",
                        spec.name, amed_rows)  # fmt: skip
    elif amed_rows:
        _check_predictor_files(directory, rows, nfes, grids)
        notes += f" AMED predictors: {directory} (sha256 of each file in table.csv)."
    cells, n = [], int(config.eval.num_samples)
    for row in rows:
        if row.needs_predictor and directory is None:
            continue
        for nfe in nfes:
            predictor = None
            if row.needs_predictor:
                path = row.predictor_path(directory, nfe)
                predictor = (path, sha256_file(path))
            try:
                sampler = row.sampler(config.sampler, schedule, nfe,
                                      predictor_file=predictor and predictor[0])  # fmt: skip
            except ValueError as err:
                source = "" if predictor is None else f" (predictor file {predictor[0]})"
                raise cv.ConfigError(
                    f"table {spec.name!r} row {row.label!r} ({row.spec}) at NFE {nfe}"
                    f"{source}: {err}"
                ) from None
            key = tb.cell_key(row, nfe, predictor and predictor[1])
            label = f"{row.label} NFE {nfe}"
            cells.append(engine.Cell(key, sampler.nfe * n, label, (row, nfe, sampler, predictor)))
    return Plan(schedule, spec, rows, list(nfes), cells, notes)


def check_inputs(config, workdir: str, plan: Plan) -> None:
    """The checkpoint (unless ``eval.params='random'``; its structure too:
    ``verify_sampling_params``) and the FID reference (``scoring.check_reference``)."""
    if config.data.name == "gmm":
        return
    if config.eval.params == "checkpoint":
        verify_sampling_params(config, workdir)
    check_reference(config, workdir)


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
    fingerprint = identity.fingerprint(tb.fingerprint_payload(config, model.identity, extractor))
    reference = features.Reference(config, workdir, extractor)
    scorer = SampleScorer.from_config(config, plan.schedule, model, extractor, reference)
    logging.info(
        "table %s: %d cells (%d samples each, metric %s)",
        spec.name, len(plan.cells), ev.num_samples, ev.metric,
    )  # fmt: skip

    def compute(cell: engine.Cell, advance: engine.Progress) -> dict:
        row, nfe, sampler, predictor = cell.payload
        record = {
            "table": spec.name, "method": row.label, "spec": row.spec,
            "grid": row.grid(config.sampler), "nfe_budget": nfe, "nfe": sampler.nfe,
            "metric": features.METRIC_LABEL[ev.metric], **scorer.score(sampler, advance),
        }  # fmt: skip
        if predictor is not None:
            record["predictor_file"], record["predictor_sha256"] = predictor
        logging.info(
            "%s NFE %d (spent %d): %s %s  [%.1f s]", row.label, nfe, sampler.nfe,
            record["metric"], record.get(FAILED) or f"{record['value']:.4g}", record["seconds"],
        )  # fmt: skip
        return record

    def report(done: dict, plot: bool = False) -> list[dict]:
        t0, t1 = plan.schedule.interval(config.sampler.t0, config.sampler.t1)
        ctx = tb.ReportContext(
            features.METRIC_LABEL[ev.metric], int(ev.num_samples),
            f"{extractor.name} (weights sha256 {extractor.weights_sha256[:12]}…)",
            reference.get().get("source"), config.sde.name, t0, t1, config.sampler.grid,
            fingerprint, describe_model(model.identity), plan.notes,
            int(ev.rmse_reference_steps) if ev.rmse else None,
        )  # fmt: skip
        return tb.write_report(out_dir, spec, plan.rows, plan.nfes, done, ctx, plot=plot)

    done = run_cells(
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
