"""The fitting experiment: fixed grids against fitted grids and tables, measured on held-out x_T.

For every problem (a model with its own starting points), method, NFE budget and *variant*
one cell is computed:

* ``default``            the method's own grid (``config.sampler.grid`` when set);
* ``fixed:<kind>``       each grid kind of ``config.fit.fixed_grids`` (``time``, ``rho``, ...);
* ``gits``, ``ld3``      a grid fitted by :func:`deis_jax.fitting.optimize_grid`;
* ``ld3+table``          LD3 with learned table corrections, fitted jointly with the grid;
* ``amed``               (AMED methods only) an AMED predictor trained by distillation on the
                         method's own grid (:mod:`deis_jax.fitting.amed`); its ``default``
                         cell is the base solver (``r = 1/2``: DPM-Solver-2, iPNDM, ...);
* ``recipe:<name>``      (method ``fit_sampler``, one per problem and NFE) the sampler of
                         :func:`deis_jax.fitting.fit_sampler` with ``recipe=<name>``
                         (``auto``: the best of its recipes on the validation split).

Fitted variants write their grid file (``grids/<problem>/<method>_nfe<nfe>_<variant>.json``),
usable as ``config.sampler.grid_file`` (``amed``: the predictor file, usable as
``config.sampler.predictor_file``; ``recipe:*``: a fitted sampler file, usable as
``config.sampler.fitted_file``). Every variant is measured on *held-out* starting points (never
fitted on) against a reference, a fine RK4 solve of the same ODE (the held-out teacher, whose
own error estimate is reported), by each sample's RMS distance ``d_b``: their RMSE
``sqrt(mean d_b^2)`` (``heldout_rmse``), mean and median -- the typical sample, which a few
samples ending in another mixture component do not move. The fitting starting points (train
+ validation) and the held-out ones are drawn from disjoint keys. For a class-conditional
network every starting point has a class (:func:`draw_labels`), which every network call of its
trajectory sees: the teachers', the fits' and the held-out measurement's.

On the mixtures, whose density is known, each cell also gets the held-out samples' NLL gap
(``nll_gap``: excess negative log-likelihood per dimension against exact data draws, the
main job's metric; the reference's own as ``reference_nll_gap``), the measure of the
stochastic samplers (AdaSDE) whose noise the RMSE counts as error.

The report (:func:`write_report`, its tables rewritten after every finished cell, so a run
stopped by a limit keeps the report of the cells it finished): ``results.md`` (held-out RMSE
per method x variant x NFE;
per NFE the best fixed against the best fitted configuration and their ratio; the
``fit_sampler`` cells against the best fixed configuration in mean and RMSE and against the
untrained iPNDM-3 in the median), ``results.csv``,
``rmse_vs_nfe.png``, ``grids.png`` (fitted grids against the default ones, in log-SNR) and
``loss_curves.png`` (LD3 validation loss against the step).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from deis_jax.common.files import atomic_write_text, sha256_file
from deis_jax.common.identity import array_digest, fingerprint
from deis_jax.common.reporting import markdown_table, plot_metric_vs_nfe, write_csv
from deis_jax.evaluation.metrics import nll_gap
from deis_jax.experiments import build
from deis_jax.experiments.build import grid_path
from deis_jax.experiments.engine import FAILED
from deis_jax.fitting.amed import FEATURE_LOSSES, LEARNED_METHODS, amed_teacher, fit_amed
from deis_jax.fitting.optimize import endpoint_samples, optimize_grid, sample_distances
from deis_jax.fitting.recipes import fit_sampler
from deis_jax.fitting.teacher import Teacher, load_or_solve_teacher
from deis_jax.sampling.class_labels import ClassLabels
from deis_jax.sampling.method_spec import MethodChoice
from deis_jax.sampling.sampler import Sampler
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.sampling.wrappers import EpsFn

FITTED_VARIANTS = ("gits", "ld3", "ld3+table", "amed")
GRID_VARIANTS = ("gits", "ld3", "ld3+table")  # fit a grid (not for AMED methods)
RECIPE_PREFIX = "recipe:"  # the variants of fit_sampler cells, e.g. "recipe:auto"
FIT_SAMPLER = "fit_sampler"  # their method label


def is_fitted(variant: str) -> bool:
    """A variant fitted to the model (a fitted grid, a predictor or a fit_sampler recipe)."""
    return variant in FITTED_VARIANTS or variant.startswith(RECIPE_PREFIX)


def applies(choice: MethodChoice, variant: str) -> bool:
    """Whether ``variant`` is a cell of ``choice``: ``amed`` (a trained rule) for AMED and the
    probe methods (EPD, EPD-Plugin, AdaSDE) only, the grid fits for the other methods only;
    default and fixed grids for all."""
    is_amed = choice.method in LEARNED_METHODS
    if variant == "amed":
        return is_amed
    return not (is_amed and variant in GRID_VARIANTS)


class Density(NamedTuple):
    """A problem's exact data density (the mixtures'), for the held-out samples' NLL gap."""

    log_prob: Callable[[np.ndarray], np.ndarray]  # log p_0 of (B, D) float64 rows
    data_log_prob: float  # mean log p_0 of exact data draws (metrics.mean_log_prob)


class FitProblem(NamedTuple):
    """A model to fit to: its eps, identity and the two sets of starting points (and, for a
    class-conditional network, their classes; when known, its data density)."""

    name: str
    eps_fn: EpsFn
    model_id: str
    x_fit: np.ndarray  # train + validation starting points
    x_heldout: np.ndarray  # never fitted on
    labels_fit: np.ndarray | None = None  # the class of every row of x_fit (None: uncond.)
    labels_heldout: np.ndarray | None = None  # ... of x_heldout
    density: Density | None = None

    def labels_identity(self) -> list[str] | None:
        """The digests of the classes (what a cached cell depends on besides the model)."""
        if self.labels_fit is None:
            return None
        return [array_digest(self.labels_fit), array_digest(self.labels_heldout)]


class Teachers(NamedTuple):
    fit: Teacher | None  # None when no cell fits a grid (GITS/LD3 read it)
    heldout: Teacher


class FitSettings(NamedTuple):
    """What the cells need of ``config.fit`` and ``config.sampler``, as plain values
    (:meth:`from_config`): the cells can be run from a notebook without a config."""

    sampler: dict[str, Any]  # the sampler fields every cell shares (grid, t0, t1, options, ...)
    teacher_points: int
    teacher_grid: str
    teacher_substeps: int
    heldout_substeps: int
    validation_fraction: float
    max_delta: float
    loss: str
    fit_dtype: str
    gits_metric: str
    gits_gamma: float
    ld3: dict[str, Any]  # optimize_grid's ld3_settings
    amed: dict[str, Any]  # loss, feature_weight, steps, learning_rate, batch_size, patience, seed
    budget: str = "nfe"  # how fit.nfes count: "nfe" (evaluations) or "parallel_nfe" (rounds)

    @classmethod
    def from_config(cls, config) -> FitSettings:
        fit = config.fit
        return cls(
            sampler=config.sampler.to_dict(),
            teacher_points=int(fit.teacher_points),
            teacher_grid=fit.teacher_grid,
            teacher_substeps=int(fit.teacher_substeps),
            heldout_substeps=int(fit.heldout_substeps),
            validation_fraction=float(fit.validation_fraction),
            max_delta=float(fit.max_delta),
            loss=fit.loss,
            fit_dtype=fit.fit_dtype,
            gits_metric=fit.gits_metric,
            gits_gamma=float(fit.gits_gamma),
            ld3=dict(fit.ld3.to_dict()),
            amed=dict(fit.amed.to_dict()),
            budget=fit.get("budget") or "nfe",
        )


def draw_starting_points(
    schedule: NoiseSchedule, seed: int, shape: tuple[int, ...], num_fit: int, num_heldout: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(x_fit, x_heldout)`` from the prior, drawn with disjoint keys of ``seed``."""
    key_fit, key_heldout = jax.random.split(jax.random.PRNGKey(seed))
    dtype = jax.numpy.float64 if jax.config.jax_enable_x64 else jax.numpy.float32
    x_fit = schedule.prior_sample(key_fit, (num_fit, *shape), dtype)
    x_heldout = schedule.prior_sample(key_heldout, (num_heldout, *shape), dtype)
    return np.asarray(x_fit), np.asarray(x_heldout)


def draw_labels(rule: ClassLabels, num_fit: int, num_heldout: int) -> tuple[np.ndarray, np.ndarray]:
    """``(labels_fit, labels_heldout)``: the classes of the starting points by the project's
    rule (``deis_jax.sampling.class_labels``), keyed by each point's index: fitting point
    ``i`` has ``rule(i)``, held-out point ``j`` the class ``j`` of the rule with the next
    seed (a stream of its own, as the held-out ``x_T`` are)."""
    held = dataclasses.replace(rule, seed=rule.seed + 1)
    return (np.asarray(rule(np.arange(num_fit)), np.int32),
            np.asarray(held(np.arange(num_heldout)), np.int32))  # fmt: skip


def teachers(
    settings: FitSettings,
    problem: FitProblem,
    schedule: NoiseSchedule,
    t0: float,
    t1: float,
    directory: str,
    with_fit: bool = True,
) -> Teachers:
    """The fitting teacher (states kept, for GITS; only ``with_fit``) and the held-out
    reference, both cached in ``directory`` with the model's identity (and the starting
    points' classes)."""
    common = dict(t0=t0, t1=t1, num_points=settings.teacher_points,
                  grid=settings.teacher_grid, model_id=problem.model_id)  # fmt: skip
    os.makedirs(directory, exist_ok=True)
    fit = None if not with_fit else load_or_solve_teacher(
        os.path.join(directory, f"{problem.name}_fit.npz"), schedule, problem.eps_fn,
        problem.x_fit, substeps=settings.teacher_substeps, keep_states=True,
        labels=problem.labels_fit, **common,
    )  # fmt: skip
    heldout = load_or_solve_teacher(
        os.path.join(directory, f"{problem.name}_heldout.npz"), schedule, problem.eps_fn,
        problem.x_heldout, substeps=settings.heldout_substeps, keep_states=False,
        labels=problem.labels_heldout, **common,
    )  # fmt: skip
    return Teachers(fit, heldout)


def compute_cell(
    settings: FitSettings,
    schedule: NoiseSchedule,
    problem: FitProblem,
    teach: Teachers,
    choice: MethodChoice,
    nfe: int,
    variant: str,
    workdir: str,
    callback=None,
    scorer=None,
    features=None,
) -> dict[str, Any]:
    """One cell's record: held-out RMSE of the variant (and the fit's numbers for fitted
    variants, whose grid file is written to :func:`grid_path` under ``workdir``); with a
    ``scorer`` (``deis_jax.experiments.scoring.SampleScorer``) also ``fd``, its distance.
    ``features``: the feature network of ``settings.amed['loss']`` when it is a feature loss
    (``deis_jax.evaluation.features.SampleFeatures``)."""
    sampler = settings.sampler
    label = FIT_SAMPLER if choice is None else choice.label
    record: dict[str, Any] = {"problem": problem.name, "method": label,
                              "nfe_budget": nfe, "variant": variant}  # fmt: skip
    if variant.startswith(RECIPE_PREFIX):
        plan, rule_params = _fit_sampler(settings, schedule, problem, teach, nfe, variant,
                                         workdir, record)  # fmt: skip
    elif variant == "amed":
        plan, rule_params = _train_amed(settings, schedule, problem, choice, nfe, workdir,
                                        record, features)  # fmt: skip
    elif variant in FITTED_VARIANTS:
        rule_params = None
        grid = optimize_grid(
            schedule, problem.eps_fn, problem.x_fit, method=choice.method, order=choice.order,
            nfe=nfe, objective="gits" if variant == "gits" else "ld3",
            grid=sampler["grid"], t0=sampler["t0"], t1=sampler["t1"],
            options=choice.options, teacher=teach.fit,
            validation_fraction=settings.validation_fraction, model_id=problem.model_id,
            learn_table=variant == "ld3+table", max_delta=settings.max_delta,
            loss=settings.loss, gits_metric=settings.gits_metric,
            gits_gamma=settings.gits_gamma, ld3_settings=dict(settings.ld3),
            fit_dtype=settings.fit_dtype, callback=callback, labels=problem.labels_fit,
        )  # fmt: skip
        path = grid_path(workdir, problem.name, label, nfe, variant)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid.save(path)
        plan = grid.plan(schedule)
        prov = grid.provenance
        record.update(grid_file=os.path.relpath(path, workdir), grid_sha256=sha256_file(path),
                      val_loss_init=prov["val_loss_init"], val_loss_fitted=prov["val_loss_fitted"],
                      fit_seconds=prov["seconds"],
                      val_loss_curve=prov["fit"].get("val_loss_curve"))  # fmt: skip
    else:
        rule_params = None
        kind = None if variant == "default" else variant.split(":", 1)[1]
        plan = _fixed_plan(sampler, schedule, problem, choice, nfe, kind, settings.budget)
    key = jax.random.PRNGKey(int(settings.amed["seed"])) if plan.stochastic else None
    samples = endpoint_samples(plan, problem.eps_fn, problem.x_heldout, rule_params=rule_params,
                               key=key, labels=problem.labels_heldout)  # fmt: skip
    dist = sample_distances(samples, teach.heldout.x0)
    finite = bool(np.all(np.isfinite(dist)))
    if problem.density is not None and finite:
        log_prob, data_log_prob = problem.density
        record.update(
            nll_gap=nll_gap(log_prob, samples, data_log_prob),
            reference_nll_gap=nll_gap(log_prob, teach.heldout.x0, data_log_prob),
        )
    record.update(nfe=plan.nfe, parallel_nfe=plan.parallel_nfe, ts=[float(t) for t in plan.ts],
                  heldout_rmse=float(np.sqrt(np.mean(dist**2))) if finite else None,
                  heldout_mean=float(np.mean(dist)) if finite else None,
                  heldout_median=float(np.median(dist)) if finite else None,
                  reference_error=teach.heldout.error_estimate)  # fmt: skip
    if record["heldout_rmse"] is None:
        record[FAILED] = "held-out samples non-finite (their RMSE is not finite)"
    if scorer is not None:  # e.g. FD-digits (experiments.scoring.SampleScorer)
        scored = scorer.score(Sampler(plan, problem.eps_fn, rule_params))
        record["fd"] = scored["value"]
        if scored.get(FAILED):
            record[FAILED] = scored[FAILED]
    return record


def artifact_problem(workdir: str, record: dict, problem: FitProblem | None = None) -> str | None:
    """Why a cached cell ``record`` cannot be reused: the grid (or predictor) file it wrote is
    missing or is not the file it wrote (sha256), or it lacks the NLL gap its ``problem``'s
    density gives (a record from before that metric); None when it can."""
    if (problem is not None and problem.density is not None and not record.get(FAILED)
            and "nll_gap" not in record):  # fmt: skip
        return "it has no nll_gap (recorded before the metric was added)"
    if "grid_file" not in record:
        return None
    path = os.path.join(workdir, record["grid_file"])
    if not os.path.isfile(path):
        return f"its file {path} is missing"
    if sha256_file(path) != record.get("grid_sha256"):
        return f"its file {path} is not the one the cell wrote (sha256 differs)"
    return None


def _fixed_plan(sampler: dict[str, Any], schedule, problem: FitProblem, choice: MethodChoice,
                nfe: int, kind: str | None, budget: str = "nfe"):  # fmt: skip
    """The method's plan on its default grid (``kind`` None) or on grid kind ``kind``, for
    the budget ``nfe`` counted as ``budget`` (``nfe`` or ``parallel_nfe``)."""
    spent = {"nfe": None, "parallel_nfe": nfe} if budget == "parallel_nfe" else {"nfe": nfe}
    return build.sampler_from_config(
        sampler, schedule, problem.eps_fn, method=choice.method, order=choice.order,
        **spent, options=choice.options, predictor_file=None, fitted_file=None,
        **({"grid": kind} if kind else {}),
    ).plan  # fmt: skip


def _train_amed(settings: FitSettings, schedule, problem: FitProblem, choice: MethodChoice,
                nfe: int, workdir: str, record: dict, features=None):  # fmt: skip
    """Train the cell's AMED predictor (teacher cached under ``teachers/``, resumable state
    under ``amed_state/``), write its file; returns ``(plan, params)`` and fills ``record``.
    A feature loss needs ``features`` (``SampleFeatures``: its function and identity)."""
    amed = settings.amed
    feature_args = {}
    if amed["loss"] in FEATURE_LOSSES:
        if features is None:
            raise ValueError(f"config.fit.amed.loss={amed['loss']!r} needs the feature network "
                             "(compute_cell(..., features=SampleFeatures))")  # fmt: skip
        feature_args = dict(feature_fn=features.fn, feature_id=features.identity,
                            feature_weight=float(amed["feature_weight"]))  # fmt: skip
    plan = _fixed_plan(settings.sampler, schedule, problem, choice, nfe, None, settings.budget)
    name = f"{problem.name}_{fingerprint([choice.label, [float(t) for t in plan.ts]])}"
    os.makedirs(os.path.join(workdir, "teachers"), exist_ok=True)
    teacher = amed_teacher(
        plan, problem.eps_fn, problem.x_fit, path=os.path.join(workdir, "teachers",
                                                               f"amed_{name}.npz"),
        model_id=problem.model_id, num_points=settings.teacher_points,
        substeps=settings.teacher_substeps, labels=problem.labels_fit,
    )  # fmt: skip
    path = grid_path(workdir, problem.name, choice.label, nfe, "amed")
    fit = fit_amed(
        plan, problem.eps_fn, teacher, loss=amed["loss"],
        validation_fraction=settings.validation_fraction,
        steps=int(amed["steps"]), learning_rate=float(amed["learning_rate"]),
        batch_size=amed["batch_size"], patience=int(amed["patience"]),
        seed=int(amed["seed"]), model_id=problem.model_id,
        state_path=os.path.join(workdir, "amed_state", f"{name}_nfe{nfe}.state"),
        **feature_args,
    )  # fmt: skip
    fit.predictor.save(path)
    prov = fit.predictor.provenance
    record.update(grid_file=os.path.relpath(path, workdir), grid_sha256=sha256_file(path),
                  val_loss_init=prov["val_loss_init"],
                  val_loss_fitted=prov["val_loss_fitted"], fit_seconds=prov["seconds"],
                  val_loss_curve=prov["val_loss_curve"],
                  teacher_error=teacher.error_estimate)  # fmt: skip
    return plan, fit.params


def _fit_sampler(settings: FitSettings, schedule, problem: FitProblem, teach: Teachers,
                 nfe: int, variant: str, workdir: str, record: dict):  # fmt: skip
    """A ``recipe:<name>`` cell: ``fit_sampler`` on the fitting starting points (with the
    fitting teacher), its file written; returns ``(plan, rule_params)`` and fills
    ``record``."""
    amed = {k: settings.amed[k] for k in ("steps", "learning_rate", "batch_size", "patience",
                                          "seed")}  # fmt: skip
    fitted = fit_sampler(
        schedule, problem.eps_fn, problem.x_fit, nfe=nfe, recipe=variant[len(RECIPE_PREFIX):],
        model_id=problem.model_id, t0=settings.sampler["t0"], t1=settings.sampler["t1"],
        loss=settings.loss, validation_fraction=settings.validation_fraction,
        teacher=teach.fit, ld3_settings=dict(settings.ld3), amed_settings=amed,
        max_delta=settings.max_delta, fit_dtype=settings.fit_dtype, labels=problem.labels_fit,
    )  # fmt: skip
    path = grid_path(workdir, problem.name, FIT_SAMPLER, nfe, variant)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fitted.save(path)
    prov = fitted.provenance
    record.update(grid_file=os.path.relpath(path, workdir), grid_sha256=sha256_file(path),
                  recipe=fitted.recipe, fit_seconds=prov["seconds"],
                  val_loss_init=fitted.report[0]["objective"],
                  val_loss_fitted=min(r["objective"] for r in fitted.report
                                      if "objective" in r))  # fmt: skip
    return fitted.plan(), fitted.rule_params()


def experiment_fingerprint(config) -> str:
    """Every setting a cell's result depends on (cell keys add problem/method/NFE/variant)."""
    identity = {k: config[k].to_dict() for k in ("sde", "data", "fit")}
    if "amed" not in config.fit.variants:  # AMED settings matter to amed cells only
        identity["fit"].pop("amed", None)
    elif config.fit.amed.get("loss") in FEATURE_LOSSES:  # and the feature network
        identity["feature_network"] = config.eval.metric
    else:  # the weight matters to the feature losses only
        identity["fit"]["amed"].pop("feature_weight", None)
    keys = ("grid", "grid_power", "t0", "t1", "options")  # (amed settings: inside config.fit)
    identity["sampler"] = {k: config.sampler.get(k) for k in keys}
    identity["seed"] = config.seed
    return fingerprint(identity)


# --- the report ----------------------------------------------------------------------------


def _cells_by_problem_and_nfe(records: list[dict], nfes):
    """``(problem, nfe, cells)`` for every problem and NFE: the cells that did not fail."""
    for problem in dict.fromkeys(r["problem"] for r in records):
        for nfe in nfes:
            yield problem, nfe, [r for r in records if r["problem"] == problem
                                 and r["nfe_budget"] == nfe and not r.get(FAILED)]  # fmt: skip


def summary_rows(records: list[dict], nfes) -> list[list[Any]]:
    """Per problem and NFE: the best fixed and the best fitted configuration (held-out RMSE
    minimum over methods and variants, failed cells left out) and their ratio."""
    rows = []
    for problem, nfe, cells in _cells_by_problem_and_nfe(records, nfes):
        fixed = [r for r in cells if not is_fitted(r["variant"])]
        fitted = [r for r in cells if is_fitted(r["variant"])]
        if not fixed or not fitted:
            continue
        bf = min(fixed, key=lambda r: r["heldout_rmse"])
        bt = min(fitted, key=lambda r: r["heldout_rmse"])
        rows.append([problem, nfe, f"{bf['method']} {bf['variant']}", bf["heldout_rmse"],
                     f"{bt['method']} {bt['variant']}", bt["heldout_rmse"],
                     bt["heldout_rmse"] / bf["heldout_rmse"]])  # fmt: skip
    return rows


RECIPE_SUMMARY_FIELDS = (
    "problem", "NFE", "fit_sampler (chosen)", "mean d", "median d", "RMSE", "best fixed (mean)",
    "mean d", "best fixed (RMSE)", "RMSE", "mean / best fixed", "RMSE / best fixed",
    "iPNDM-3 median d", "median / iPNDM-3",
)  # fmt: skip


def recipe_summary_rows(records: list[dict], nfes) -> list[list[Any]]:
    """Per problem, NFE and ``fit_sampler`` cell: its held-out mean, median and RMSE against
    the best fixed-grid configuration (by mean and by RMSE, separately) and against the
    untrained iPNDM-3 on its default grid in the median."""
    rows = []
    for problem, nfe, cells in _cells_by_problem_and_nfe(records, nfes):
        fixed = [r for r in cells if not is_fitted(r["variant"])]
        ipndm = [r for r in fixed if r["method"] == "ipndm3" and r["variant"] == "default"]
        for r in (r for r in cells if r["variant"].startswith(RECIPE_PREFIX)):
            if not fixed or r.get("heldout_mean") is None:
                continue
            by_mean = min(fixed, key=lambda f: f.get("heldout_mean") or np.inf)
            by_rmse = min(fixed, key=lambda f: f["heldout_rmse"])
            base = ipndm[0]["heldout_median"] if ipndm else None
            rows.append([
                problem, nfe, f"{r['variant']} ({r.get('recipe')})", r["heldout_mean"],
                r["heldout_median"], r["heldout_rmse"],
                f"{by_mean['method']} {by_mean['variant']}", by_mean["heldout_mean"],
                f"{by_rmse['method']} {by_rmse['variant']}", by_rmse["heldout_rmse"],
                r["heldout_mean"] / by_mean["heldout_mean"],
                r["heldout_rmse"] / by_rmse["heldout_rmse"], base,
                None if base is None else r["heldout_median"] / base,
            ])  # fmt: skip
    return rows


def metric_rows(records: list[dict], problem: str, variants, nfes, metric: str) -> list[list]:
    """``[method, variant, value at each NFE (None if missing, "failed" for a failed cell)]``
    rows of one problem."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in records if r["problem"] == problem):
        for variant in variants:
            cells = {r["nfe_budget"]: r for r in records if r["problem"] == problem
                     and r["method"] == method and r["variant"] == variant}  # fmt: skip
            if cells:
                rows.append([method, variant] + [_value(cells.get(n), metric) for n in nfes])
    return rows


def _value(record: dict | None, metric: str):
    if record is None:
        return None
    return "failed" if record.get(FAILED) else record.get(metric)


def write_report(workdir: str, records: list[dict], variants, nfes, plot_nfe: int,
                 plots: bool = True) -> None:  # fmt: skip
    """``results.{md,csv}`` and (``plots``) ``rmse_vs_nfe.png``, ``grids.png``,
    ``loss_curves.png``; missing cells (a run still going, or stopped) are left blank."""
    fields = ["problem", "method", "variant", "nfe_budget", "nfe", "parallel_nfe", "heldout_rmse",
              "heldout_mean", "heldout_median", "nll_gap", "reference_nll_gap", "fd", "recipe",
              "val_loss_init", "val_loss_fitted", "fit_seconds", "reference_error", "grid_file",
              "failed"]  # fmt: skip
    write_csv(os.path.join(workdir, "results.csv"), records, fields)
    lines = ["# Fitted grids and tables: held-out RMSE against the reference\n"]
    lines.append(
        "Each cell: RMSE (over held-out samples and dimensions) of the sampler's output against "
        "a fine RK4 solve from the same x_T, which were never used for fitting.\n"
    )
    lines.append("## Best fixed vs best fitted\n")
    lines.append(markdown_table(
        ["problem", "NFE", "best fixed", "RMSE", "best fitted", "RMSE", "fitted / fixed"],
        summary_rows(records, nfes),
    ))  # fmt: skip
    recipes = recipe_summary_rows(records, nfes)
    if recipes:
        lines.append("\n## fit_sampler against the best fixed configuration\n")
        lines.append(
            "Held-out per-sample RMS distances d to the reference: their mean, median and RMSE "
            "(sqrt of the mean square). The best fixed configuration is chosen separately for "
            "the mean and for the RMSE; the median is compared with the untrained iPNDM-3 on "
            "its default grid.\n"
        )
        lines.append(markdown_table(list(RECIPE_SUMMARY_FIELDS), recipes))
    problems = list(dict.fromkeys(r["problem"] for r in records))
    panels = []
    for problem in problems:
        rows = metric_rows(records, problem, variants, nfes, "heldout_rmse")
        series = {}
        for row in rows:
            pts = [(n, v) for n, v in zip(nfes, row[2:], strict=True) if isinstance(v, float)]
            series[f"{row[0]} {row[1]}"] = ([n for n, _ in pts], [v for _, v in pts])
        err = max(r["reference_error"] for r in records if r["problem"] == problem)
        lines.append(f"\n## {problem}\n\nReference error estimate: {err:.2e}.\n")
        lines.append(markdown_table(["method", "grid"] + [f"NFE {n}" for n in nfes], rows))
        panels.append((problem, series))
        gaps = [r["reference_nll_gap"] for r in records
                if r["problem"] == problem and "reference_nll_gap" in r]  # fmt: skip
        if gaps:
            lines.append(
                f"\n### {problem}: NLL gap of the held-out samples (nats/dim)\n\n"
                "Excess negative log-likelihood per dimension under the true density, against "
                f"exact data draws; the reference solve's own samples: {gaps[0]:.3e} (the "
                "Monte-Carlo floor of this metric on these starting points).\n"
            )
            lines.append(
                markdown_table(
                    ["method", "grid"] + [f"NFE {n}" for n in nfes],
                    metric_rows(records, problem, variants, nfes, "nll_gap"),
                )
            )
        if any("fd" in r for r in records if r["problem"] == problem):
            lines.append(f"\n### {problem}: Frechet distance (config.eval's metric)\n")
            lines.append(
                markdown_table(
                    ["method", "grid"] + [f"NFE {n}" for n in nfes],
                    metric_rows(records, problem, variants, nfes, "fd"),
                )
            )
    atomic_write_text(os.path.join(workdir, "results.md"), "\n".join(lines))
    if plots:
        plot_metric_vs_nfe(panels, os.path.join(workdir, "rmse_vs_nfe.png"), "held-out RMSE",
                           xticks=list(nfes))  # fmt: skip
        plot_grids_and_losses(workdir, records, plot_nfe)


def plot_grids_and_losses(workdir: str, records: list[dict], nfe: int) -> None:
    """Grids at ``nfe`` (step index against log-SNR, one panel per problem and method) and
    the LD3 validation-loss curves, relative to the initial grid's loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deis_jax.common.files import save_figure

    chosen = [r for r in records if r["nfe_budget"] == nfe]
    if not chosen:
        return
    keys = list(dict.fromkeys((r["problem"], r["method"]) for r in chosen))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    for ax, (problem, method) in zip(axes[0], keys, strict=True):
        for r in chosen:
            if (r["problem"], r["method"]) == (problem, method):
                ts = np.asarray(r["ts"])
                ax.plot(np.arange(ts.size), np.log(ts), marker="o", ms=3, label=r["variant"])
        ax.set_title(f"{problem} {method}", fontsize=8)
        ax.set_xlabel("grid index")
    axes[0, 0].set_ylabel("log t")
    axes[0, -1].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, os.path.join(workdir, "grids.png"))
    plt.close(fig)
    curves = [r for r in chosen if r.get("val_loss_curve")]
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in curves:
        c = np.asarray(r["val_loss_curve"]) / r["val_loss_init"]
        ax.semilogy(c, label=f"{r['problem']} {r['method']} {r['variant']}", lw=1)
    ax.set_xlabel("evaluation")
    ax.set_ylabel("validation loss / initial")
    ax.set_title(f"LD3 fits at NFE {nfe}", fontsize=9)
    ax.legend(fontsize=5)
    save_figure(fig, os.path.join(workdir, "loss_curves.png"))
    plt.close(fig)
