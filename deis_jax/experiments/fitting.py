"""The fitting experiment: fixed grids against fitted grids and tables, measured on held-out x_T.

For every problem (a model with its own starting points), method, NFE budget and *variant*
one cell is computed:

* ``default``            the method's own grid (``config.sampler.grid`` when set);
* ``fixed:<kind>``       each grid kind of ``config.fit.fixed_grids`` (``time``, ``rho``, ...);
* ``gits``, ``ld3``      a grid fitted by :func:`deis_jax.fitting.optimize_grid`;
* ``ld3+table``          LD3 with learned table corrections, fitted jointly with the grid;
* ``amed``               (AMED methods only) an AMED predictor trained by distillation on the
                         method's own grid (:mod:`deis_jax.fitting.amed`); its ``default``
                         cell is the base solver (``r = 1/2``: DPM-Solver-2, iPNDM, ...).

Fitted variants write their grid file (``grids/<problem>/<method>_nfe<nfe>_<variant>.json``),
usable as ``config.sampler.grid_file`` (``amed``: the predictor file, usable as
``config.sampler.predictor_file``). Every variant is measured by its RMSE against a
reference on *held-out* starting points (never fitted on): a fine RK4 solve of the same ODE,
the held-out teacher, whose own error estimate is reported. The fitting starting points (train
+ validation) and the held-out ones are drawn from disjoint keys.

The report (:func:`write_report`): ``results.md`` (held-out RMSE per method x variant x NFE;
per NFE the best fixed against the best fitted configuration and their ratio), ``results.csv``,
``rmse_vs_nfe.png``, ``grids.png`` (fitted grids against the default ones, in log-SNR) and
``loss_curves.png`` (LD3 validation loss against the step).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np

from deis_jax import build
from deis_jax.experiments.engine import fingerprint
from deis_jax.experiments.sealed_cells import FAILED
from deis_jax.fitting.amed import amed_teacher, fit_amed
from deis_jax.fitting.optimize import endpoint_loss, optimize_grid
from deis_jax.fitting.teacher import Teacher, load_or_solve_teacher
from deis_jax.io_utils import atomic_write_text, sha256_file
from deis_jax.reporting import markdown_table, plot_metric_vs_nfe, write_csv
from deis_jax.sampling.method_spec import MethodChoice
from deis_jax.sampling.sampler import Sampler
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.sampling.solvers.amed import AMED_METHODS
from deis_jax.sampling.wrappers import EpsFn

FITTED_VARIANTS = ("gits", "ld3", "ld3+table", "amed")
GRID_VARIANTS = ("gits", "ld3", "ld3+table")  # fit a grid (not for AMED methods)


def applies(choice: MethodChoice, variant: str) -> bool:
    """Whether ``variant`` is a cell of ``choice``: ``amed`` for AMED methods only, the grid
    fits for the other methods only; default and fixed grids for all."""
    is_amed = choice.method in AMED_METHODS
    if variant == "amed":
        return is_amed
    return not (is_amed and variant in GRID_VARIANTS)


class FitProblem(NamedTuple):
    """A model to fit to: its eps, identity and the two sets of starting points."""

    name: str
    eps_fn: EpsFn
    model_id: str
    x_fit: np.ndarray  # train + validation starting points
    x_heldout: np.ndarray  # never fitted on


class Teachers(NamedTuple):
    fit: Teacher | None  # None when no cell fits a grid (GITS/LD3 read it)
    heldout: Teacher


def draw_starting_points(
    schedule: NoiseSchedule, seed: int, shape: tuple[int, ...], num_fit: int, num_heldout: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(x_fit, x_heldout)`` from the prior, drawn with disjoint keys of ``seed``."""
    key_fit, key_heldout = jax.random.split(jax.random.PRNGKey(seed))
    dtype = jax.numpy.float64 if jax.config.jax_enable_x64 else jax.numpy.float32
    x_fit = schedule.prior_sample(key_fit, (num_fit, *shape), dtype)
    x_heldout = schedule.prior_sample(key_heldout, (num_heldout, *shape), dtype)
    return np.asarray(x_fit), np.asarray(x_heldout)


def teachers(
    fit_cfg,
    problem: FitProblem,
    schedule: NoiseSchedule,
    t0: float,
    t1: float,
    directory: str,
    with_fit: bool = True,
) -> Teachers:
    """The fitting teacher (states kept, for GITS; only ``with_fit``) and the held-out
    reference, both cached in ``directory`` with the model's identity."""
    common = dict(t0=t0, t1=t1, num_points=int(fit_cfg.teacher_points),
                  grid=fit_cfg.teacher_grid, model_id=problem.model_id)  # fmt: skip
    os.makedirs(directory, exist_ok=True)
    fit = None if not with_fit else load_or_solve_teacher(
        os.path.join(directory, f"{problem.name}_fit.npz"), schedule, problem.eps_fn,
        problem.x_fit, substeps=int(fit_cfg.teacher_substeps), keep_states=True, **common,
    )  # fmt: skip
    heldout = load_or_solve_teacher(
        os.path.join(directory, f"{problem.name}_heldout.npz"), schedule, problem.eps_fn,
        problem.x_heldout, substeps=int(fit_cfg.heldout_substeps), keep_states=False, **common,
    )  # fmt: skip
    return Teachers(fit, heldout)


def grid_path(workdir: str, problem: str, choice: MethodChoice, nfe: int, variant: str) -> str:
    name = f"{choice.label.replace(':', '_').replace(',', '_').replace('=', '-')}"
    return os.path.join(workdir, "grids", problem, f"{name}_nfe{nfe}_{variant}.json")


def compute_cell(
    config,
    schedule: NoiseSchedule,
    problem: FitProblem,
    teach: Teachers,
    choice: MethodChoice,
    nfe: int,
    variant: str,
    workdir: str,
    callback=None,
    scorer=None,
) -> dict[str, Any]:
    """One cell's record: held-out RMSE of the variant (and the fit's numbers for fitted
    variants, whose grid file is written to :func:`grid_path` under ``workdir``); with a
    ``scorer`` (``deis_jax.experiments.scoring.SampleScorer``) also ``fd``, its distance."""
    fit_cfg, sampler_cfg = config.fit, config.sampler
    record: dict[str, Any] = {"problem": problem.name, "method": choice.label,
                              "nfe_budget": nfe, "variant": variant}  # fmt: skip
    if variant == "amed":
        plan, rule_params = _train_amed(config, schedule, problem, choice, nfe, workdir, record)
    elif variant in FITTED_VARIANTS:
        rule_params = None
        grid = optimize_grid(
            schedule, problem.eps_fn, problem.x_fit, method=choice.method, order=choice.order,
            nfe=nfe, objective="gits" if variant == "gits" else "ld3",
            grid=sampler_cfg.grid, t0=sampler_cfg.t0, t1=sampler_cfg.t1,
            options=choice.options, teacher=teach.fit,
            validation_fraction=float(fit_cfg.validation_fraction), model_id=problem.model_id,
            learn_table=variant == "ld3+table", max_delta=float(fit_cfg.max_delta),
            gits_metric=fit_cfg.gits_metric, gits_gamma=float(fit_cfg.gits_gamma),
            ld3_settings=dict(fit_cfg.ld3.to_dict()), callback=callback,
        )  # fmt: skip
        path = grid_path(workdir, problem.name, choice, nfe, variant)
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
        plan = _fixed_plan(sampler_cfg, schedule, problem, choice, nfe, kind)
    rmse = float(np.sqrt(endpoint_loss(plan, problem.eps_fn, problem.x_heldout,
                                       teach.heldout.x0, rule_params=rule_params)))  # fmt: skip
    record.update(nfe=plan.nfe, heldout_rmse=rmse if np.isfinite(rmse) else None,
                  ts=[float(t) for t in plan.ts],
                  reference_error=teach.heldout.error_estimate)  # fmt: skip
    if record["heldout_rmse"] is None:
        record[FAILED] = "held-out samples non-finite (their RMSE is not finite)"
    if scorer is not None:  # e.g. FD-digits on config.eval.num_samples images
        scored = scorer.score(Sampler(plan, problem.eps_fn, rule_params))
        record["fd"] = scored["value"]
        if scored.get(FAILED):
            record[FAILED] = scored[FAILED]
    return record


def artifact_problem(workdir: str, record: dict) -> str | None:
    """Why a cached cell ``record`` cannot be reused: the grid (or predictor) file it wrote is
    missing or is not the file it wrote (sha256); None when it can."""
    if "grid_file" not in record:
        return None
    path = os.path.join(workdir, record["grid_file"])
    if not os.path.isfile(path):
        return f"its file {path} is missing"
    if sha256_file(path) != record.get("grid_sha256"):
        return f"its file {path} is not the one the cell wrote (sha256 differs)"
    return None


def _fixed_plan(sampler_cfg, schedule, problem: FitProblem, choice: MethodChoice, nfe: int,
                kind: str | None):  # fmt: skip
    """The method's plan on its default grid (``kind`` None) or on grid kind ``kind``."""
    return build.sampler_from_config(
        sampler_cfg, schedule, problem.eps_fn, method=choice.method, order=choice.order,
        nfe=nfe, options=choice.options, predictor_file=None,
        **({"grid": kind} if kind else {}),
    ).plan  # fmt: skip


def _train_amed(config, schedule, problem: FitProblem, choice: MethodChoice, nfe: int,
                workdir: str, record: dict):  # fmt: skip
    """Train the cell's AMED predictor (teacher cached under ``teachers/``, resumable state
    under ``amed_state/``), write its file; returns ``(plan, params)`` and fills ``record``."""
    amed_cfg = config.fit.amed
    plan = _fixed_plan(config.sampler, schedule, problem, choice, nfe, None)
    name = f"{problem.name}_{fingerprint([choice.label, [float(t) for t in plan.ts]])}"
    os.makedirs(os.path.join(workdir, "teachers"), exist_ok=True)
    teacher = amed_teacher(
        plan, problem.eps_fn, problem.x_fit, path=os.path.join(workdir, "teachers",
                                                               f"amed_{name}.npz"),
        model_id=problem.model_id, refine=int(amed_cfg.refine), substeps=int(amed_cfg.substeps),
    )  # fmt: skip
    path = grid_path(workdir, problem.name, choice, nfe, "amed")
    fit = fit_amed(
        plan, problem.eps_fn, teacher, loss=amed_cfg.loss,
        validation_fraction=float(config.fit.validation_fraction),
        steps=int(amed_cfg.steps), learning_rate=float(amed_cfg.learning_rate),
        batch_size=amed_cfg.batch_size, patience=int(amed_cfg.patience),
        seed=int(amed_cfg.seed), model_id=problem.model_id,
        state_path=os.path.join(workdir, "amed_state", f"{name}_nfe{nfe}.state"),
    )  # fmt: skip
    fit.predictor.save(path)
    prov = fit.predictor.provenance
    record.update(grid_file=os.path.relpath(path, workdir), grid_sha256=sha256_file(path),
                  val_loss_init=prov["val_loss_init"],
                  val_loss_fitted=prov["val_loss_fitted"], fit_seconds=prov["seconds"],
                  val_loss_curve=prov["val_loss_curve"],
                  teacher_error=teacher.error_estimate)  # fmt: skip
    return plan, fit.params


def experiment_fingerprint(config) -> str:
    """Every setting a cell's result depends on (cell keys add problem/method/NFE/variant)."""
    identity = {k: config[k].to_dict() for k in ("sde", "data", "fit")}
    if "amed" not in config.fit.variants:  # AMED settings matter to amed cells only
        identity["fit"].pop("amed", None)
    keys = ("grid", "grid_power", "t0", "t1", "options")  # (amed settings: inside config.fit)
    identity["sampler"] = {k: config.sampler.get(k) for k in keys}
    identity["seed"] = config.seed
    return fingerprint(identity)


# --- the report ----------------------------------------------------------------------------


def summary_rows(records: list[dict], nfes) -> list[list[Any]]:
    """Per problem and NFE: the best fixed and the best fitted configuration (held-out RMSE
    minimum over methods and variants, failed cells left out) and their ratio."""
    rows = []
    for problem in dict.fromkeys(r["problem"] for r in records):
        for nfe in nfes:
            cells = [r for r in records if r["problem"] == problem and r["nfe_budget"] == nfe
                     and not r.get(FAILED)]  # fmt: skip
            fixed = [r for r in cells if r["variant"] not in FITTED_VARIANTS]
            fitted = [r for r in cells if r["variant"] in FITTED_VARIANTS]
            if not fixed or not fitted:
                continue
            bf = min(fixed, key=lambda r: r["heldout_rmse"])
            bt = min(fitted, key=lambda r: r["heldout_rmse"])
            rows.append([problem, nfe, f"{bf['method']} {bf['variant']}", bf["heldout_rmse"],
                         f"{bt['method']} {bt['variant']}", bt["heldout_rmse"],
                         bt["heldout_rmse"] / bf["heldout_rmse"]])  # fmt: skip
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


def write_report(workdir: str, records: list[dict], variants, nfes, plot_nfe: int) -> None:
    """``results.{md,csv}``, ``rmse_vs_nfe.png``, ``grids.png``, ``loss_curves.png``."""
    fields = ["problem", "method", "variant", "nfe_budget", "nfe", "heldout_rmse", "fd",
              "val_loss_init", "val_loss_fitted", "fit_seconds", "reference_error",
              "grid_file", "failed"]  # fmt: skip
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
        if any("fd" in r for r in records if r["problem"] == problem):
            lines.append(f"\n### {problem}: Frechet distance (config.eval's metric)\n")
            lines.append(
                markdown_table(
                    ["method", "grid"] + [f"NFE {n}" for n in nfes],
                    metric_rows(records, problem, variants, nfes, "fd"),
                )
            )
    atomic_write_text(os.path.join(workdir, "results.md"), "\n".join(lines))
    plot_metric_vs_nfe(panels, os.path.join(workdir, "rmse_vs_nfe.png"), "held-out RMSE",
                       xticks=list(nfes))  # fmt: skip
    plot_grids_and_losses(workdir, records, plot_nfe)


def plot_grids_and_losses(workdir: str, records: list[dict], nfe: int) -> None:
    """Grids at ``nfe`` (step index against log-SNR, one panel per problem and method) and
    the LD3 validation-loss curves, relative to the initial grid's loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deis_jax.io_utils import save_figure

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
