"""``fit_sampler``: a sampler fitted to anyone's model in one call.

    fitted = deis.fit_sampler(schedule, eps_fn, x_T, nfe=5, model_id="my-model")
    print(fitted.report_markdown())              # what was tried, and the gain
    x0 = fitted.sample(eps_fn, x_new)            # any starting points
    fitted.save("sampler_nfe5.json")             # configs: sampler.fitted_file
    fitted = deis.FittedSampler.load("sampler_nfe5.json", schedule, model_id="my-model")

**Recipes** (``RECIPES``; ``recipe="auto"`` tries ``AUTO_RECIPES`` and keeps the best):

    ipndm3+ld3+table+afs   iPNDM-3, LD3 grid + learned table, analytical first step
    ipndm3+ld3+table       the same without AFS
    tab3+ld3+table         tAB-DEIS-3, LD3 grid + learned table
    amed_ipndm3            AMED-Plugin on iPNDM-3 (AFS at odd budgets, where it spends them)
    ipndm3+ld3+afs, tab3+ld3+table+afs, ...   more in ``RECIPES``

Every budget is spent exactly: a recipe that cannot spend ``nfe`` (none of these here: AMED
takes AFS exactly when the budget is odd) would be refused before any work.

**One teacher.** RK4 solves from ``x_T`` on the grid fitter's fine grid (61 points uniform in
log-SNR, 4 substeps each: an error estimate near 1e-8 on the mixtures), shared by every
recipe: the LD3 fits and AMED-Plugin's endpoint loss read its endpoints only.

**Splits.** The last ``validation_fraction`` of ``x_T`` is the validation split: it stops
every fit early and judges every recipe; no fit trains on it.

**Judged on typical samples.** On the validation split every candidate is measured by each
sample's RMS distance to the teacher ``d_b``: the objective (``loss``, :data:`ld3.LOSSES`), the
mean, the median and ``sqrt(mean d_b^2)``. A recipe's fit is kept only if it lowers the
objective *and* does not raise the median against its untrained base (the same method, AFS and
budget on the method's default grid; AMED's ``r = 1/2``); otherwise the base stands in for it
and the report says why. The default sampler (``baseline``, iPNDM-3 on its default grid) is a
candidate too, so the result is never worse than it on validation. The chosen candidate is the
one with the lowest objective.

**Class labels.** For a class-conditional network ``labels`` gives the class of every row of
``x_T``: the teacher is solved for them, and every fit and every validation measurement passes
each row's class with it (the fitted sampler itself is not tied to them).

**The default loss** is ``rms`` (the mean of the per-sample distances, LD3's per-sample L2
norm), chosen by measurement: on the outlier-prone 3072-D mixture
(``GaussianMixture.scattered``) the squared loss (``mse``) bends the grid and table to chase
the few samples that end in another component and worsens the typical sample, where ``rms``
improves both the median and the mean (see the README's fitting section for the numbers).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from deis_jax.common.files import atomic_write_text, read_sealed_record, sealed_json
from deis_jax.common.identity import describe_object, settings_differences
from deis_jax.fitting import ld3
from deis_jax.fitting.amed import AmedPredictorFile, fit_amed
from deis_jax.fitting.grid_file import OptimizedGrid
from deis_jax.fitting.optimize import (
    check_teacher,
    endpoint_distances,
    objective_value,
    optimize_grid,
)
from deis_jax.fitting.teacher import Teacher, check_labels, solve_teacher
from deis_jax.sampling.method_spec import parse_method_spec
from deis_jax.sampling.rule_params import RuleParams
from deis_jax.sampling.sampler import SamplingPlan, make_plan, sample
from deis_jax.sampling.sde import NoiseSchedule, check_schedule
from deis_jax.sampling.wrappers import EpsFn, supports_features

logger = logging.getLogger(__name__)

FORMAT = "deis_jax.FittedSampler"
FORMAT_VERSION = 1
REFIT = 'fit it again with deis.fit_sampler, or delete its "sha256" entry to use a file edited ' \
    "on purpose"  # fmt: skip
# One learned r, c, a per step takes larger steps than AMED's network (fit_amed's 5e-3).
STEPWISE_AMED_LEARNING_RATE = 0.05
AMED_OPTIONS = {"scale_time": 0.2}  # the AMED-Plugin options of the paper's setup (our configs)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One way to fit a sampler: ``method``/``order`` on an LD3 grid (with a learned ``table``
    when set) or, with ``amed``, by AMED distillation; with the analytical first step
    (``afs``; None: exactly when the budget needs it, AMED's odd budgets)."""

    name: str
    method: str
    order: int
    table: bool = False
    afs: bool | None = False
    amed: bool = False

    def uses_afs(self, nfe: int) -> bool:
        return nfe % 2 == 1 if self.afs is None else self.afs


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("ipndm3+ld3+table+afs", "ipndm", 3, table=True, afs=True),
        Recipe("ipndm3+ld3+table", "ipndm", 3, table=True),
        Recipe("ipndm3+ld3+afs", "ipndm", 3, afs=True),
        Recipe("tab3+ld3+table+afs", "tab", 3, table=True, afs=True),
        Recipe("tab3+ld3+table", "tab", 3, table=True),
        Recipe("amed_ipndm3", "amed_ipndm", 3, afs=None, amed=True),
    )
}
AUTO_RECIPES = ("ipndm3+ld3+table+afs", "ipndm3+ld3+table", "tab3+ld3+table", "amed_ipndm3")
BASELINE = "ipndm3"


def resolve_recipes(recipe: str | tuple[str, ...] | list[str]) -> tuple[Recipe, ...]:
    """``"auto"`` (``AUTO_RECIPES``), one name of ``RECIPES`` or a sequence of names."""
    names = AUTO_RECIPES if recipe == "auto" else (recipe,) if isinstance(recipe, str) else recipe
    names = tuple(names)
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        raise ValueError(f"recipe must be 'auto' or among {tuple(RECIPES)}, got {recipe!r}")
    return tuple(RECIPES[n] for n in names)


# --- the result -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FittedSampler:
    """A sampler fitted to one model: the chosen candidate's grid file (``grid``: method,
    grid, table corrections) or AMED predictor file (``predictor``), what it was fitted for
    (schedule, interval, NFE, model id) and the report of every recipe tried.

    ``sample(eps_fn, x_T)`` runs it; ``save``/``load`` keep it in one sealed JSON file;
    ``load`` and :meth:`check` refuse it for another schedule, interval, NFE or model id,
    naming each difference."""

    recipe: str
    nfe: int
    model_id: str
    schedule: dict
    grid: OptimizedGrid | None
    predictor: AmedPredictorFile | None
    report: list[dict]
    provenance: dict
    bound_schedule: NoiseSchedule | None = None

    def __post_init__(self):
        if (self.grid is None) == (self.predictor is None):
            raise ValueError("a FittedSampler holds exactly one of grid and predictor")

    @property
    def artifact(self) -> OptimizedGrid | AmedPredictorFile:
        return self.grid if self.grid is not None else self.predictor

    @property
    def t0(self) -> float:
        return float(self.artifact.ts[-1])

    @property
    def t1(self) -> float:
        return float(self.artifact.ts[0])

    def settings(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "nfe": self.nfe, "t0": self.t0, "t1": self.t1,
                "model_id": self.model_id}  # fmt: skip

    def check(self, schedule: NoiseSchedule, *, nfe: int | None = None, t0: float | None = None,
              t1: float | None = None, model_id: str | None = None) -> None:  # fmt: skip
        """``ValueError`` naming every given setting (None: not checked) that differs from
        the ones this sampler was fitted for."""
        check_schedule(schedule)
        wanted = {"schedule": describe_object(schedule), "nfe": nfe, "t0": t0, "t1": t1,
                  "model_id": model_id}  # fmt: skip
        wanted = {k: v for k, v in wanted.items() if v is not None}
        diffs = settings_differences(self.settings(), wanted, verb="fitted", rel_tol=1e-12)
        if diffs:
            raise ValueError("the fitted sampler was fitted for other settings: "
                             + "; ".join(diffs))  # fmt: skip

    def plan(self, schedule: NoiseSchedule | None = None) -> SamplingPlan:
        """The sampling plan (grid, table, rule) on ``schedule`` (default: the bound one)."""
        schedule = self._schedule(schedule)
        return self.artifact.plan(schedule)

    def rule_params(self) -> RuleParams | None:
        """The AMED predictor's parameters, or None for a grid (and table) sampler."""
        return None if self.predictor is None else self.predictor.rule_params()

    def sample(self, eps_fn: EpsFn, x_T, key=None, *, schedule: NoiseSchedule | None = None,
               **kwargs):  # fmt: skip
        """``deis_jax.sample(self.plan(), eps_fn, x_T, key, rule_params=..., **kwargs)``."""
        return sample(self.plan(schedule), eps_fn, x_T, key, rule_params=self.rule_params(),
                      **kwargs)  # fmt: skip

    def _schedule(self, schedule: NoiseSchedule | None) -> NoiseSchedule:
        schedule = self.bound_schedule if schedule is None else schedule
        if schedule is None:
            raise ValueError("pass the schedule (this FittedSampler was not loaded with one)")
        return schedule

    def report_markdown(self) -> str:
        """The report as a Markdown table (validation split; distances ``d_b`` per sample)."""
        rows = ["| candidate | status | objective | mean d | median d | sqrt(mean d^2) | base "
                "mean d | base median d | seconds |", "|---" * 9 + "|"]  # fmt: skip
        for r in self.report:
            cells = [r["name"], r["status"]] + [_fmt(r.get(k)) for k in (
                "objective", "mean", "median", "sqrt_mse", "base_mean", "base_median",
                "seconds")]  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
        gain = self.provenance.get("gain_over_default")
        chosen = f"Chosen: **{self.recipe}**" + (
            f", {gain:.2f}x below the default sampler's mean distance." if gain else "."
        )
        return "\n".join(rows) + "\n\n" + chosen + "\n"

    # --- the file -----------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "recipe": self.recipe,
            "nfe": self.nfe, "model_id": self.model_id, "schedule": self.schedule,
            "kind": "grid" if self.grid is not None else "amed",
            "artifact": self.artifact.to_record(), "report": self.report,
            "provenance": self.provenance,
        }  # fmt: skip

    def save(self, path: str) -> None:
        """Write the sealed JSON file atomically."""
        atomic_write_text(path, sealed_json(self.to_record(), indent=1))

    @classmethod
    def load(cls, path: str, schedule: NoiseSchedule, *, nfe: int | None = None,
             t0: float | None = None, t1: float | None = None,
             model_id: str | None = None) -> FittedSampler:  # fmt: skip
        """Read a file of :meth:`save`, check it (:meth:`check`; the settings given) and bind
        ``schedule``. ``ValueError`` naming the path for a damaged or foreign file."""
        record = read_sealed_record(path, FORMAT, FORMAT_VERSION, "fitted sampler file", REFIT)
        try:
            reader = OptimizedGrid if record["kind"] == "grid" else AmedPredictorFile
            artifact = reader.from_record(record["artifact"], path)
            fitted = cls(
                recipe=str(record["recipe"]), nfe=int(record["nfe"]),
                model_id=str(record["model_id"]), schedule=dict(record["schedule"]),
                grid=artifact if record["kind"] == "grid" else None,
                predictor=artifact if record["kind"] != "grid" else None,
                report=list(record["report"]), provenance=dict(record["provenance"]),
            )  # fmt: skip
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a valid fitted sampler file: {err}") from None
        fitted.check(schedule, nfe=nfe, t0=t0, t1=t1, model_id=model_id)
        return dataclasses.replace(fitted, bound_schedule=schedule)


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --- fitting --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Candidate:
    """A sampler on the validation split: its artifact and its distances."""

    name: str
    artifact: OptimizedGrid | AmedPredictorFile
    distances: np.ndarray
    loss: str

    @property
    def objective(self) -> float:
        return objective_value(self.distances, self.loss)

    def measures(self, prefix: str = "") -> dict[str, float]:
        d = self.distances
        return {f"{prefix}objective": self.objective, f"{prefix}mean": float(np.mean(d)),
                f"{prefix}median": float(np.median(d)),
                f"{prefix}sqrt_mse": float(np.sqrt(np.mean(d**2)))}  # fmt: skip


def fit_sampler(
    schedule: NoiseSchedule,
    eps_fn: EpsFn,
    x_T,
    *,
    nfe: int,
    recipe: str | tuple[str, ...] = "auto",
    model_id: str = "",
    t0: float | None = None,
    t1: float | None = None,
    loss: str = ld3.DEFAULT_LOSS,
    validation_fraction: float = 0.25,
    teacher: Teacher | None = None,
    baseline: str = BASELINE,
    ld3_settings: dict[str, Any] | None = None,
    amed_settings: dict[str, Any] | None = None,
    max_delta: float = ld3.DEFAULT_MAX_DELTA,
    fit_dtype: str | None = "float32",
    labels=None,
) -> FittedSampler:
    """Fit the recipes of ``recipe`` to ``eps_fn`` at the budget ``nfe`` on the starting
    points ``x_T`` and return the best candidate on the validation split (module docstring).

    ``eps_fn(x, t)`` with a scalar ``t`` (the model contract of ``deis_jax.sampling.wrappers``;
    AMED's per-sample times are handled inside deis_jax). ``model_id`` names the model in the
    file (a fitted sampler is refused for another id). ``[t0, t1]``: the schedule's default
    interval when None. ``teacher``: a teacher of exactly these ``x_T`` on the interval (e.g.
    from ``load_or_solve_teacher``), else one is solved here. ``ld3_settings``/
    ``amed_settings`` are ``fit_ld3`` / ``fit_amed`` keywords over their defaults (AMED's
    feature-free stepwise predictor at a rate of ``STEPWISE_AMED_LEARNING_RATE``).
    ``fit_dtype``: the precision of the LD3 loops (``optimize_grid``; float32 halves their time
    at image size; None: ``x_T``'s); the teacher and every measurement stay in ``x_T``'s
    precision. ``labels``: a class-conditional network's class of every row of ``x_T`` (int
    ``(n,)``). Every fit is logged with its rate and ETA; the whole call with a line per
    recipe.
    """
    check_schedule(schedule)
    recipes = resolve_recipes(recipe)
    if loss not in ld3.LOSSES:
        raise ValueError(f"loss must be one of {ld3.LOSSES}, got {loss!r}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    base_choice = parse_method_spec(baseline)
    t0, t1 = schedule.interval(t0, t1)
    default = make_plan(schedule, method=base_choice.method, order=base_choice.order, nfe=nfe,
                        t0=t0, t1=t1, **base_choice.options)  # fmt: skip
    for r in recipes:  # every budget is checked before any work
        _base_plan(schedule, r, nfe, t0, t1, eps_fn)
    x_T = np.asarray(x_T)
    labels = None if labels is None else check_labels(labels, len(x_T))
    num_val = max(1, int(round(validation_fraction * len(x_T))))
    if x_T.ndim < 2 or len(x_T) - num_val < 2:
        raise ValueError(f"x_T must be a batch (n, ...) with room for a training split and "
                         f"{num_val} validation rows, got shape {x_T.shape}")  # fmt: skip
    start = time.perf_counter()
    if teacher is None:
        teacher = solve_teacher(schedule, eps_fn, x_T, t0=t0, t1=t1, keep_states=False,
                                model_id=model_id, labels=labels)  # fmt: skip
    else:
        check_teacher(teacher, x_T, labels)
    val = slice(len(x_T) - num_val, None)
    c_val = None if labels is None else labels[val]

    def candidate(name, artifact, rule_params=None) -> _Candidate:
        plan = artifact.plan(schedule)
        d = endpoint_distances(plan, eps_fn, x_T[val], teacher.x0[val], rule_params=rule_params,
                               labels=c_val)  # fmt: skip
        return _Candidate(name, artifact, d, loss)

    chosen = candidate(f"default ({baseline})", _fixed_grid(default, model_id))
    report = [{"name": chosen.name, "status": "untrained", **chosen.measures(), "seconds": 0.0}]
    default_mean = float(np.mean(chosen.distances))
    for r in recipes:
        began = time.perf_counter()
        base = candidate(f"{r.name} base", _fixed_grid(_base_plan(schedule, r, nfe, t0, t1,
                                                                  eps_fn), model_id))  # fmt: skip
        try:
            fitted = _fit_recipe(r, schedule, eps_fn, x_T, teacher, nfe, t0, t1, loss,
                                 validation_fraction, model_id, max_delta, ld3_settings,
                                 amed_settings, fit_dtype, candidate)  # fmt: skip
        except Exception as err:  # a recipe that fails must not lose the others
            logger.warning("fit_sampler: recipe %s failed (%s: %s)", r.name,
                           type(err).__name__, err)  # fmt: skip
            report.append(
                {
                    "name": r.name,
                    "status": f"failed: {type(err).__name__}: {err}",
                    **base.measures("base_"),
                    "seconds": time.perf_counter() - began,
                }
            )
            continue
        status, kept = _judge(fitted, base)
        entry = {"name": r.name, "status": status, **fitted.measures(),
                 **base.measures("base_"), "seconds": time.perf_counter() - began}  # fmt: skip
        report.append(entry)
        logger.info("fit_sampler: %s at NFE %d: %s (mean d %.4g, median %.4g; base %.4g, "
                    "%.4g), %.1f s", r.name, nfe, status, entry["mean"], entry["median"],
                    entry["base_mean"], entry["base_median"], entry["seconds"])  # fmt: skip
        if kept.objective < chosen.objective:
            chosen = kept
    provenance = {
        "loss": loss, "num_train": len(x_T) - num_val, "num_val": num_val,
        "teacher": teacher.settings, "teacher_error_estimate": teacher.error_estimate,
        "seconds": time.perf_counter() - start, "default": baseline,
        "gain_over_default": default_mean / max(float(np.mean(chosen.distances)), 1e-300),
        "chosen_mean": float(np.mean(chosen.distances)),
        "chosen_median": float(np.median(chosen.distances)),
    }  # fmt: skip
    artifact = chosen.artifact
    is_grid = isinstance(artifact, OptimizedGrid)
    return FittedSampler(
        recipe=chosen.name, nfe=int(nfe), model_id=model_id, schedule=describe_object(schedule),
        grid=artifact if is_grid else None, predictor=None if is_grid else artifact,
        report=report, provenance=provenance, bound_schedule=schedule,
    )  # fmt: skip


def _judge(fitted: _Candidate, base: _Candidate) -> tuple[str, _Candidate]:
    """The fit if it lowers the objective without raising the median, else the base (and
    why)."""
    if not fitted.objective < base.objective:
        return "fallback: the fit did not lower the validation objective", base
    if np.median(fitted.distances) > np.median(base.distances):
        return ("refused: the fit raised the median validation distance (it traded typical "
                "samples for a few hard ones)", base)  # fmt: skip
    return "fitted", fitted


def _base_plan(schedule, r: Recipe, nfe: int, t0: float, t1: float, eps_fn) -> SamplingPlan:
    """The recipe's untrained sampler: its method, AFS and budget on the default grid (AMED:
    its base solver, ``r = 1/2``). Refuses a budget the recipe cannot spend."""
    return make_plan(schedule, method=r.method, order=r.order, nfe=nfe, t0=t0, t1=t1,
                     afs=r.uses_afs(nfe), **_amed_options(r, eps_fn))  # fmt: skip


def _amed_options(r: Recipe, eps_fn) -> dict[str, Any]:
    if not r.amed:
        return {}
    predictor = "bottleneck" if supports_features(eps_fn) else "stepwise"
    return {"predictor": predictor, **AMED_OPTIONS}


def _fixed_grid(plan: SamplingPlan, model_id: str) -> OptimizedGrid:
    """``plan`` (no table corrections, no rule) recorded as a grid file."""
    options = dict(plan.options, **({"afs": True} if plan.afs else {}))
    return OptimizedGrid(ts=plan.ts, method=plan.method, order=plan.order, nfe=plan.nfe,
                         options=options, schedule=describe_object(plan.schedule),
                         objective="fixed", provenance={"model_id": model_id})  # fmt: skip


def _fit_recipe(r: Recipe, schedule, eps_fn, x_T, teacher, nfe, t0, t1, loss,
                validation_fraction, model_id, max_delta, ld3_settings, amed_settings,
                fit_dtype, candidate) -> _Candidate:  # fmt: skip
    """Fit one recipe and measure it on the validation split."""
    if r.amed:
        plan = _base_plan(schedule, r, nfe, t0, t1, eps_fn)
        settings = dict(amed_settings or {})
        if not plan.rule.needs_features:
            settings.setdefault("learning_rate", STEPWISE_AMED_LEARNING_RATE)
        fit = fit_amed(plan, eps_fn, teacher, loss="endpoint",
                       validation_fraction=validation_fraction, model_id=model_id,
                       **settings)  # fmt: skip
        return candidate(r.name, fit.predictor, fit.params)
    settings = dict(ld3_settings or {})
    grid = optimize_grid(schedule, eps_fn, x_T, method=r.method, order=r.order, nfe=nfe,
                         afs=r.uses_afs(nfe), t0=t0, t1=t1, teacher=teacher,
                         validation_fraction=validation_fraction, model_id=model_id,
                         learn_table=r.table, max_delta=max_delta, loss=loss,
                         ld3_settings=settings, fit_dtype=fit_dtype,
                         labels=teacher.labels)  # fmt: skip
    return candidate(r.name, grid)
