"""Paper tables: the registry of tables (rows = methods, columns = NFE budgets) and their report.

A table is a :class:`TableSpec`: rows naming a ``deis_jax.sampling.method_spec`` string,
per-row overrides of ``config.sampler`` (grid, options) and the published row of
``deis_jax.evaluation.paper_numbers`` they are compared with. ``--mode=table`` runs every
(row, NFE) cell through the experiment engine (``deis_jax.experiments.engine``), each cell
scored by ``deis_jax.experiments.scoring``; this module builds the cells' samplers, keys and
records and writes ``table.md`` (ours and the paper's numbers side by side), ``table.csv`` and
``metric_vs_nfe.png`` (log-log).

Registered tables:

``deis_cifar10``       DEIS Table "Variants of DEIS on CIFAR10": DDIM, rho2Heun, rho3Kutta,
                       rho4RK, rhoAB1-3, tAB1-3 at NFE 5, 10, 15, 20, 50 on the config's grid.
``ipndm_ersde_dpmpp``  The training-free peers of the AMED / diff-solvers CIFAR-10 table
                       (DPM-Solver++(3M), UniPC-3, iPNDM, DDIM, EDM-Heun, DEIS-tAB3) and
                       ER-SDE-Solver-3 (stochastic), at NFE 3, 5, 7, 9, 20.
``amed_cifar10``       The AMED paper's CIFAR-10 table: DPM-Solver++(3M), UniPC, iPNDM, DDIM,
                       EDM-Heun and DPM-Solver-2 (both with the analytical first step, AFS),
                       AMED-Solver and AMED-Plugin on iPNDM (AFS), at NFE 3, 5, 7, 9. The AMED
                       rows sample with trained predictors (``config.eval.amed_predictors``:
                       the directory of the ``<label>_nfe<n>_amed.json`` files ``--mode=fit``
                       writes); without it they are not run.
``amed_imagenet64``    The same rows against the AMED paper's ImageNet-64 panel (EDM's
                       class-conditional ADM, ``configs/edm_imagenet64_cond.py``).
``epd_cifar10``        EPD-Solver and EPD-Plugin (K = 2 probes, NFE counted as the papers'
                       parallel NFE) and AdaSDE next to iPNDM, AMED-Solver and AMED-Plugin at
                       NFE 3, 5, 7, 9, with the EPD and AdaSDE papers' numbers; the learned
                       rows read their files as the AMED rows (``configs/epd_cifar10.py``).
``epd_imagenet64``     The same rows against the papers' ImageNet-64 panels.
``ersde_imagenet64``   ER-SDE-Solver-3 on EDM's ImageNet-64 network at NFE 10, 20, 50 (the
                       paper's 3.45 / 2.24 FID at 20 / 50), with ER-SDE-Solver-1/2, the AMED
                       panel's training-free peers and DEIS-tAB3 at the same budgets.

AMED rows (:attr:`TableRow.needs_predictor`) read one predictor file per NFE
(:meth:`TableRow.predictor_path`), which must have been trained for the row's method, options,
NFE, interval and time grid; the file's sha256 is part of the cell's cache key
(:func:`cell_key`), so a retrained predictor never reuses the cells of an old one.

More are added with ``register_table(TableSpec(...))``; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deis_jax.common.files import atomic_write_bytes, atomic_write_text
from deis_jax.common.reporting import markdown_table, plot_metric_vs_nfe, write_csv
from deis_jax.evaluation.paper_numbers import PAPER_TABLES, PaperValue, with_extra_nfe
from deis_jax.experiments import build
from deis_jax.experiments.build import grid_path
from deis_jax.experiments.engine import FAILED
from deis_jax.fitting.amed import LEARNED_METHODS
from deis_jax.models.loading import num_classes
from deis_jax.sampling import solvers
from deis_jax.sampling.method_spec import MethodChoice, parse_method_spec
from deis_jax.sampling.sampler import EpsFn, Sampler
from deis_jax.sampling.sde import NoiseSchedule

# --------------------------------------------------------------------------------------------
# registry


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One method of a table: ``spec`` (``deis_jax.sampling.method_spec``), ``overrides`` of
    ``config.sampler`` fields (``grid``, ``grid_power``, ``final_denoise``, ``options``) and
    the published row it is compared with, ``paper = (paper table key, row name)``;
    ``budget``: how the table's NFE counts for this row, ``nfe`` (network evaluations) or
    ``parallel_nfe`` (sequential rounds: EPD's papers, whose K probes are one round)."""

    label: str
    spec: str
    overrides: dict = dataclasses.field(default_factory=dict)
    paper: tuple[str, str] | None = None
    budget: str = "nfe"

    @property
    def choice(self) -> MethodChoice:
        return parse_method_spec(self.spec)

    def paper_value(self, nfe: int) -> PaperValue | None:
        """The published number at NFE budget ``nfe`` (None: not published / no paper row)."""
        if self.paper is None or self.paper[0] not in PAPER_TABLES:
            return None
        return PAPER_TABLES[self.paper[0]].get(self.paper[1], nfe)

    def grid(self, sampler_config) -> str:
        """The time grid this row samples on: its override, ``config.sampler.grid``, else
        the method's default."""
        return (
            self.overrides.get("grid")
            or sampler_config.grid
            or solvers.get_method(self.choice.method).default_grid
        )

    @property
    def needs_predictor(self) -> bool:
        """Whether the row is a learned rule (AMED, EPD, AdaSDE), sampled with a trained
        predictor file."""
        return self.choice.method in LEARNED_METHODS

    def predictor_path(self, directory: str, nfe: int) -> str:
        """The predictor file of this row at NFE ``nfe`` in ``directory``: the name
        ``--mode=fit`` gives it (``deis_jax.experiments.build.grid_path``, variant
        ``amed``: ``<sanitized method label>_nfe<nfe>_amed.json``)."""
        name = os.path.basename(grid_path("", "", self.choice.label, nfe, "amed"))
        return os.path.join(directory, name)

    def sampler(
        self,
        sampler_config,
        schedule: NoiseSchedule,
        nfe: int,
        eps_fn: EpsFn | None = None,
        *,
        predictor_file: str | None = None,
    ) -> Sampler:
        """``config.sampler`` with this row's method and overrides at an NFE budget (the
        network is bound later; ``eps_fn=None`` puts a placeholder). ``predictor_file``: a
        trained AMED predictor (``build.sampler_from_config`` refuses one trained for other
        settings, and so does this row when its grid is not the row's); ``config.sampler``'s
        own ``predictor_file`` is never used."""
        choice = self.choice
        overrides = dict(self.overrides)
        options = {**choice.options, **overrides.pop("options", {})}
        base = _without_predictor(sampler_config)

        def build_sampler(path):
            return build.sampler_from_config(
                base,
                schedule,
                (lambda x, t: x) if eps_fn is None else eps_fn,
                method=choice.method,
                order=choice.order,
                **(
                    {"nfe": None, "parallel_nfe": nfe}
                    if self.budget == "parallel_nfe"
                    else {"nfe": nfe}
                ),
                nfe_rounding=NFE_ROUNDING,
                options=options,
                predictor_file=path,
                **overrides,
            )

        sampler = build_sampler(None)
        if predictor_file is None:
            return sampler
        learned = build_sampler(predictor_file)
        if learned.ts.shape != sampler.ts.shape or not np.allclose(
            learned.ts, sampler.ts, rtol=1e-9, atol=0.0
        ):
            grid = self.grid(sampler_config)
            raise ValueError(
                f"the AMED predictor file was trained on another time grid than the row's "
                f"{grid!r} grid (file: {_fmt_ts(learned.ts)}; row: {_fmt_ts(sampler.ts)}); "
                f"train it with --config.sampler.grid={grid}"
            )
        return learned


def _without_predictor(sampler_config) -> dict:
    cfg = sampler_config.to_dict() if hasattr(sampler_config, "to_dict") else dict(sampler_config)
    cfg["predictor_file"] = cfg["fitted_file"] = None  # a row is its own method and grid
    return cfg


def _fmt_ts(ts) -> str:
    return "[" + ", ".join(f"{float(t):.4g}" for t in ts) + "]"


def cell_key(row: TableRow, nfe: int, predictor_sha256: str | None = None) -> str:
    """The cache key of a (row, NFE budget) cell; a cell sampled with a predictor file has the
    file's content (``predictor_sha256``) in its key."""
    key = f"{row.label}|{row.spec}|{json.dumps(row.overrides, sort_keys=True)}|{nfe}"
    key += "" if row.budget == "nfe" else f"|{row.budget}"
    return key if predictor_sha256 is None else f"{key}|predictor={predictor_sha256}"


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """A table: its ``rows``, NFE budgets ``nfes`` and the ``notes`` printed under it."""

    name: str
    title: str
    rows: tuple[TableRow, ...]
    nfes: tuple[int, ...]
    notes: str = ""

    def select(self, labels: str | Sequence[str] | None) -> list[TableRow]:
        """The rows called ``labels``, in the order given (None: every row; a row named
        twice is taken once). A label matches its row's label or :func:`ascii_label`, in
        any case, with or without punctuation (``'rho2heun'``, ``'Rho2Heun'`` and
        ``'ρ2Heun'`` name one row). ``ValueError`` for an unknown label (listing both forms)
        or an empty selection."""
        if labels is None:
            return list(self.rows)
        labels = (labels,) if isinstance(labels, str) else tuple(labels)
        by_key = {label_key(r.label): r for r in self.rows}
        if not labels or any(label_key(w) not in by_key for w in labels):
            known = tuple(r.label for r in self.rows)
            names = tuple(ascii_label(label) for label in known)
            raise ValueError(
                f"must be a non-empty subset of the row labels {known} or their ASCII names "
                f"{names} (any case), got {labels!r}"
            )
        return [by_key[key] for key in dict.fromkeys(label_key(w) for w in labels)]


def ascii_label(label: str) -> str:
    """A row label as typed on a command line: ``ρ`` spelled ``rho``, lower case
    (``'ρ2Heun'`` -> ``'rho2heun'``, ``'EDM (Heun)'`` -> ``'edm (heun)'``)."""
    return label.replace("ρ", "rho").replace("Ρ", "rho").lower()


def label_key(label: str) -> str:
    """What :meth:`TableSpec.select` matches on: :func:`ascii_label` without spaces and
    punctuation other than ``+`` (``'EDM (Heun)'``, ``'edm-heun'`` -> ``'edmheun'``)."""
    return re.sub(r"[^0-9a-z+]", "", ascii_label(str(label)))


TABLES: dict[str, TableSpec] = {}

# The papers' tables label a Runge-Kutta row by a budget it cannot spend exactly and spend
# s * ceil(NFE / s) (the DEIS table's superscripts): table rows round budgets up, and every
# row reports the NFE it spent.
NFE_ROUNDING = "up"


def register_table(spec: TableSpec) -> TableSpec:
    """Add ``spec`` to :data:`TABLES` (names and row labels must be unique)."""
    if spec.name in TABLES:
        raise ValueError(f"table {spec.name!r} is already registered")
    labels = [r.label for r in spec.rows]
    if len({label_key(label) for label in labels}) != len(labels):
        raise ValueError(f"table {spec.name!r} has duplicate row labels {labels} (ASCII names)")
    TABLES[spec.name] = spec
    return spec


def _deis(label: str, spec: str) -> TableRow:
    return TableRow(label, spec, {}, ("deis_cifar10", label))


register_table(
    TableSpec(
        name="deis_cifar10",
        title="Variants of DEIS (DEIS paper, CIFAR-10 table)",
        rows=(
            _deis("DDIM", "ddim"),
            _deis("ρ2Heun", "rhork2:tableau=heun"),
            _deis("ρ3Kutta", "rhork3:tableau=kutta3"),
            _deis("ρ4RK", "rhork4:tableau=rk4"),
            _deis("ρAB1", "rhoab1"),
            _deis("ρAB2", "rhoab2"),
            _deis("ρAB3", "rhoab3"),
            _deis("tAB1", "tab1"),
            _deis("tAB2", "tab2"),
            _deis("tAB3", "tab3"),
        ),
        nfes=(5, 10, 15, 20, 50),
        notes="Every row uses config.sampler's grid (DEIS: quadratic in t, t0 = 1e-3).",
    )
)

_LOG_SNR_LOF = {"grid": "log_snr", "options": {"lower_order_final_below": None}}
_AMED = "amed_cifar10"
_KARRAS = {"grid": "karras"}
# the training-free peers of the AMED / diff-solvers CIFAR-10 table, in both tables below
_PEER_ROWS = (
    TableRow("DPM-Solver++(3M)", "dpmpp3", _LOG_SNR_LOF, (_AMED, "DPM-Solver++(3M)")),
    TableRow("UniPC", "unipc3", {"grid": "log_snr"}, (_AMED, "UniPC")),
    TableRow("iPNDM", "ipndm3", _KARRAS, (_AMED, "iPNDM")),
    TableRow("DDIM", "ddim", _KARRAS, (_AMED, "DDIM")),
)

register_table(
    TableSpec(
        name="ipndm_ersde_dpmpp",
        title="Training-free peers (AMED / diff-solvers CIFAR-10 table, ER-SDE)",
        rows=(
            *_PEER_ROWS,
            TableRow(
                "EDM (Heun)", "rhork2:tableau=heun", {"grid": "karras"}, (_AMED, "EDM (Heun)")
            ),
            TableRow(
                "DEIS-tAB3",
                "tab3",
                {"grid": "quadratic"},
                ("deis_tab3_cifar10_diffsolvers", "DEIS-tAB3"),
            ),
            TableRow(
                "ER-SDE-Solver-3",
                "ersde3",
                {"grid": "karras"},
                ("ersde_cifar10", "ER-SDE-Solver-3"),
            ),
        ),
        nfes=(3, 5, 7, 9, 20),
        notes=(
            "Published numbers are on EDM's CIFAR-10 network (not score_sde's), with "
            "dynamic thresholding for DPM-Solver++/UniPC: compare shapes, not values. "
            "DPM-Solver-2 (with AFS) and the AMED rows of the published table are in the "
            "amed_cifar10 table (--config.table=amed_cifar10)."
        ),
    )
)

register_table(
    TableSpec(
        name="amed_cifar10",
        title="AMED-Solver / AMED-Plugin and their peers (AMED paper, CIFAR-10 table)",
        rows=(
            *_PEER_ROWS,
            TableRow("EDM (Heun)", "rhork2:tableau=heun,afs=true", _KARRAS, (_AMED, "EDM (Heun)")),
            TableRow("DPM-Solver-2", "dpm2:afs=true", _KARRAS, (_AMED, "DPM-Solver-2")),
            TableRow("AMED-Solver", "amed:afs=true", {"grid": "linear"}, (_AMED, "AMED-Solver")),
            TableRow(
                "AMED-Plugin",
                "amed_ipndm3:afs=true,scale_time=0.2",
                _KARRAS,
                (_AMED, "AMED-Plugin (iPNDM)"),
            ),
        ),
        nfes=(3, 5, 7, 9),
        notes=(
            "Published numbers are on EDM's CIFAR-10 network (not score_sde's), with "
            "dynamic thresholding for DPM-Solver++/UniPC: compare shapes, not values. "
            "EDM (Heun), DPM-Solver-2, AMED-Solver and AMED-Plugin use the analytical first "
            "step (AFS): N two-evaluation steps spend 2N-1 NFE, exactly the odd budgets. "
            "AMED-Solver samples on the time-uniform grid (the paper's), AMED-Plugin on "
            "iPNDM-3 on EDM's rho = 7 grid, each with the trained predictor of "
            "config.eval.amed_predictors for its NFE."
        ),
    )
)


_AMED_IN64 = "amed_imagenet64"


def _imagenet64(row: TableRow) -> TableRow:
    """A row of the CIFAR-10 AMED table compared with the ImageNet-64 panel instead."""
    return dataclasses.replace(row, paper=(_AMED_IN64, row.paper[1]) if row.paper else None)


register_table(
    TableSpec(
        name="amed_imagenet64",
        title="AMED-Solver / AMED-Plugin and their peers (AMED paper, ImageNet-64 table)",
        rows=tuple(_imagenet64(row) for row in TABLES["amed_cifar10"].rows),
        nfes=(3, 5, 7, 9),
        notes=(
            "Published numbers are on EDM's class-conditional ImageNet-64 ADM "
            "(configs/edm_imagenet64_cond.py), one random class per sample. Rows and "
            "settings as amed_cifar10; the AMED rows need predictors trained on this network."
        ),
    )
)


def _epd_rows(paper: str, adasde_paper: str, epd_scale_time: float) -> tuple[TableRow, ...]:
    """EPD-Solver / EPD-Plugin (K = 2, parallel NFE) and AdaSDE (K = 1) with the released
    runs' settings (specs/epd_adasde.md §1.5, §2.4), the solvers on the time-uniform grid,
    the plugin on EDM's rho = 7 grid (as AMED-Plugin, and the authors' launch.sh), and the
    figure's iPNDM / AMED rows."""
    linear, par = {"grid": "linear"}, "parallel_nfe"
    return (
        TableRow("iPNDM", "ipndm3", _KARRAS, (paper, "iPNDM")),
        TableRow("AMED-Solver", "amed:afs=true", linear, (paper, "AMED-Solver")),
        TableRow("AMED-Plugin", "amed_ipndm3:afs=true,scale_time=0.2", _KARRAS,
                 (paper, "AMED-Plugin (iPNDM)")),
        TableRow("EPD-Solver", f"epd:afs=true,scale_dir=0.05,scale_time={epd_scale_time}",
                 linear, (paper, "EPD-Solver"), par),
        TableRow("EPD-Plugin", "epd_ipndm2:afs=true,scale_dir=0.05,scale_time=0.2", _KARRAS,
                 (paper, "EPD-Plugin (iPNDM)"), par),
        TableRow("AdaSDE", "adasde:afs=true,gamma_max=0.01,scale_dir=0.05,scale_time=0.2",
                 linear, (adasde_paper, "AdaSDE")),
    )  # fmt: skip


_EPD_NOTES = (
    "NFE is the papers' count: EPD rows spend it in sequential rounds (parallel_nfe; their "
    "K = 2 probes are one batched call, so 5 / 8 / 11 / 14 real evaluations at 3 / 5 / 7 / 9), "
    "every other row in network evaluations. Published numbers are on EDM's networks; the "
    "AdaSDE row is compared with the AdaSDE paper, the others with the EPD paper's figure. "
    "The learned rows sample with the trained files of config.eval.amed_predictors "
    "(--mode=fit, variant amed, with config.fit.budget='parallel_nfe')."
)

register_table(
    TableSpec(
        name="epd_cifar10",
        title="EPD-Solver / EPD-Plugin / AdaSDE and their peers (EPD, AdaSDE papers, CIFAR-10)",
        rows=_epd_rows("epd_cifar10", "adasde_cifar10", 0.05),
        nfes=(3, 5, 7, 9),
        notes=_EPD_NOTES,
    )
)

register_table(
    TableSpec(
        name="epd_imagenet64",
        title="EPD-Solver / EPD-Plugin / AdaSDE and their peers (EPD, AdaSDE papers, ImageNet-64)",
        rows=_epd_rows("epd_imagenet64", "adasde_imagenet64", 0.1),
        nfes=(3, 5, 7, 9),
        notes=_EPD_NOTES + " EDM's class-conditional ImageNet-64 ADM, one random class per "
        "sample (configs/edm_imagenet64_cond.py).",
    )
)

_ERSDE_IN64 = ("ersde_imagenet64", "ER-SDE-Solver-3")
register_table(
    TableSpec(
        name="ersde_imagenet64",
        title="ER-SDE-Solvers on EDM's ImageNet-64 network (ER-SDE paper) and their peers",
        rows=(
            TableRow("ER-SDE-Solver-3", "ersde3", _KARRAS, _ERSDE_IN64),
            TableRow("ER-SDE-Solver-2", "ersde2", _KARRAS),
            TableRow("ER-SDE-Solver-1", "ersde1", _KARRAS),
            *(_imagenet64(row) for row in _PEER_ROWS),
            TableRow(
                "DEIS-tAB3",
                "tab3",
                {"grid": "quadratic"},
                ("deis_tab3_imagenet64_diffsolvers", "DEIS-tAB3"),
            ),
        ),
        nfes=(10, 20, 50),
        notes=(
            "Model: EDM's edm-imagenet-64x64-cond-adm (configs/edm_imagenet64_cond.py), one "
            "random class per sample; ER-SDE-Solvers with the authors' default noise scale "
            "(phi type 7, sde_5) on EDM's rho = 7 grid over [0.002, 80]. The published "
            "ER-SDE numbers are the abstract's (NFE 20 and 50); AMED's peers are published at "
            "NFE 3-9 only (amed_imagenet64), DEIS-tAB3 at NFE 3-10."
        ),
    )
)


# --------------------------------------------------------------------------------------------
# cache identity


EVAL_FIELDS = (
    "metric", "num_samples", "seed", "inception_score", "is_splits", "kid", "kid_subsets",
    "kid_subset_size", "rmse", "rmse_num_samples", "rmse_reference_steps", "reference_stats",
    "reference_split", "reference_max_images",
)  # fmt: skip


def fingerprint_payload(config, model_identity: dict, extractor) -> dict[str, Any]:
    """Everything a table cell's result depends on besides its row and NFE (model, SDE, data,
    sampler base settings, eval settings, extractor weights, and for a class-conditional
    network the classes and guidance): hashed with ``identity.fingerprint`` into the cache
    fingerprint."""
    options = config.sampler.get("options")
    conditioning = {}
    if num_classes(config):
        conditioning["class_labels"] = {
            k: config.sampling.get(k) for k in ("labels", "class_label", "guidance_scale")
        }
    return {
        "sde": config.sde.to_dict(),
        "data": [config.data.name, config.data.image_size, config.data.num_channels,
                 config.data.centered],
        "sampler": {k: config.sampler.get(k) for k in
                    ("grid", "grid_power", "t0", "t1", "final_denoise")},
        "sampler_options": options.to_dict() if options is not None else {},
        "model": model_identity,
        "extractor": [extractor.name, extractor.weights_sha256],
        "eval": {k: config.eval.get(k) for k in EVAL_FIELDS},
        **conditioning,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# report


CSV_FIELDS = (
    "table", "method", "spec", "grid", "nfe_budget", "nfe", "metric", "value", "paper",
    "paper_nfe", "is_mean", "is_std", "kid_mean", "kid_std", "rmse", "rmse_reference_error",
    "num_samples", "nonfinite_samples", "failed", "seconds", "predictor_file", "predictor_sha256",
)  # fmt: skip
REPORT_FILES = (("md", "table.md"), ("csv", "table.csv"), ("png", "metric_vs_nfe.png"))


@dataclasses.dataclass(frozen=True)
class ReportContext:
    """What the text around the table says: metric label, sample count, extractor and
    reference, SDE and interval, default grid, model, cache fingerprint, RMSE steps."""

    metric: str
    num_samples: int
    extractor: str
    reference: str | None
    sde: str
    t0: float
    t1: float
    grid: str | None
    fingerprint: str
    model: str
    notes: str
    rmse_steps: int | None


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def _curves(rows, nfes, index, key) -> dict:
    curves = {}
    for row in rows:
        recs = [index[(row.label, n)] for n in nfes if (row.label, n) in index]
        recs = [r for r in recs if r.get(key) is not None]
        if recs:
            curves[row.label] = ([r["nfe"] for r in recs], [r[key] for r in recs])
    return curves


def write_report(
    out_dir: str,
    spec: TableSpec,
    rows: Sequence[TableRow],
    nfes: Sequence[int],
    done: Mapping[str, dict],
    ctx: ReportContext,
    *,
    plot: bool,
) -> list[dict]:
    """Rewrite ``table.csv`` and ``table.md`` (and ``metric_vs_nfe.png`` when ``plot``) from
    the finished cells ``done`` (``{cell key: record}``, the records of this run's cells);
    returns the records in table order, with the paper's value (``paper``, ``paper_nfe``)
    added. A failed cell (its ``failed`` reason) reads "failed" in every table and is listed
    with its reason under them."""
    by_cell = {(r["method"], r["nfe_budget"]): r for r in done.values()}
    records = []
    for row in rows:
        for nfe in nfes:
            rec = by_cell.get((row.label, nfe))
            if rec is None:
                continue
            paper = row.paper_value(nfe)
            rec = dict(rec)
            rec["paper"] = None if paper is None else paper.value
            rec["paper_nfe"] = None if paper is None else nfe + paper.extra_nfe
            records.append(rec)
    write_csv(os.path.join(out_dir, "table.csv"), records, CSV_FIELDS)
    index = {(r["method"], r["nfe_budget"]): r for r in records}
    metric = ctx.metric

    def cell(row, nfe, key, digits=4):
        r = index.get((row.label, nfe))
        if r is not None and r.get(FAILED):
            return "failed"
        if r is None or r.get(key) is None:
            return "—"
        return with_extra_nfe(_fmt(r[key], digits), r["nfe"] - r["nfe_budget"])

    headers = ["method"]
    for nfe in nfes:
        headers += [f"NFE {nfe}", "paper"]
    main_rows = []
    for row in rows:
        line = [row.label]
        for nfe in nfes:
            paper = row.paper_value(nfe)
            line += [cell(row, nfe, "value"), "—" if paper is None else paper.text()]
        main_rows.append(line)
    sections = [
        f"# {spec.title}: {metric} (ours) and the paper's numbers\n",
        f"Model: {ctx.model}. "
        f"Our {metric} on {ctx.num_samples} samples per cell against {ctx.reference}; "
        f"extractor {ctx.extractor}. SDE {ctx.sde}, t0 = {ctx.t0}, t1 = {ctx.t1}, "
        f"default grid {ctx.grid}. ⁺k: the sampler spent k NFE more than the column "
        f"(Runge-Kutta rounds up to whole steps), as the superscripts in the paper. "
        f"{ctx.notes}\n",
        markdown_table(headers, main_rows),
    ]
    extra = [("is_mean", "IS (extractor logits)", 4), ("kid_mean", "KID", 3)]
    ref_err = [r["rmse_reference_error"] for r in records if r.get("rmse_reference_error")]
    ref_note = f", its error estimate {max(ref_err):.1e}" if ref_err else ""
    steps = ctx.rmse_steps
    extra.append(
        (
            "rmse",
            f"RMSE vs a reference ODE solve on the first x_T (RK4 in ρ, {steps} "
            f"and {2 * (steps or 0)} steps{ref_note})",
            3,
        )
    )
    for key, title, digits in extra:
        if any(r.get(key) is not None for r in records):
            body = [[row.label] + [cell(row, n, key, digits) for n in nfes] for row in rows]
            header = ["method"] + [f"NFE {n}" for n in nfes]
            sections.append(f"## {title}\n\n" + markdown_table(header, body))
    failed = [f"{r['method']} NFE {r['nfe_budget']}: {r[FAILED]}" for r in records if r.get(FAILED)]
    if failed:
        sections.append(
            "## Failed cells\n\nNot results (computed again by the next run):\n\n"
            + "".join(f"- {line}\n" for line in failed)
        )
    seconds = sum(r.get("seconds") or 0.0 for r in records)
    sections.append(
        f"{len(records)} cells, {seconds / 60:.1f} min of sampling and scoring "
        f"(cache fingerprint {ctx.fingerprint}).\n"
    )
    atomic_write_text(os.path.join(out_dir, "table.md"), "\n".join(sections))
    if plot:
        panels = [(f"ours: {metric}", _curves(rows, nfes, index, "value"))]
        paper_curves = {}
        for row in rows:
            pts = [(n + p.extra_nfe, p.value) for n in nfes if (p := row.paper_value(n))]
            if pts:
                paper_curves[row.label] = ([p[0] for p in pts], [p[1] for p in pts])
        if paper_curves:
            panels.append(("paper: FID", paper_curves))
        if any(r.get("rmse") is not None for r in records):
            panels.append(("ours: RMSE vs reference solve", _curves(rows, nfes, index, "rmse")))
        path = os.path.join(out_dir, "metric_vs_nfe.png")
        plot_metric_vs_nfe(panels, path, "(see panel title)", xticks=sorted(nfes))
    return records


def export_report(out_dir: str, prefix: str) -> None:
    """Copy the report to ``<prefix>.md``, ``<prefix>.csv`` and ``<prefix>.png``."""
    for ext, name in REPORT_FILES:
        with open(os.path.join(out_dir, name), "rb") as f:
            atomic_write_bytes(f"{prefix}.{ext}", f.read())
