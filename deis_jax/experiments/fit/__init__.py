"""``--mode=fit``: fit time grids (and tables) to a model, and measure them on held-out x_T.

    python main.py --config=configs/fit_gmm.py --workdir=runs/fit_gmm
    python main.py --config=configs/fit_gmm.py:digits --workdir=runs/digits --mode=fit

The cells and the report are :mod:`deis_jax.experiments.fit.cells`: every method of
``fit.methods`` at every NFE of ``fit.nfes`` on its default grid, on each fixed grid kind of
``fit.fixed_grids``, and with each fitted variant of ``fit.variants`` (``gits``, ``ld3``,
``ld3+table``), all measured by the RMSE against a fine reference solve on held-out starting
points. The problems are the exact-score mixtures of ``data.dims`` (``data.name='gmm'``) or
the image model of the config (``fit.params``: its checkpoint as ``--mode=sample`` loads it,
or ``random``). A class-conditional network (EDM's ImageNet-64 ADM) gives every fitting and
held-out starting point a class by ``config.sampling.labels`` (``class_label``; keyed by the
point's index, ``cells.draw_labels``), which its teacher, every fit and the held-out
measurement pass to the network with that point's rows. Writes the grid files
(``grids/``), the teacher caches (``teachers/``), the cell cache ``results.jsonl`` (a killed
run resumes where it stopped) and the report.

On resume every cached cell is checked (:mod:`deis_jax.experiments.engine`): a damaged
line, or a fitted cell whose grid / predictor file is missing or not the file it wrote (its
sha256 is in the cell's record), is named in the log and computed again (the file rewritten);
a damaged teacher cache is solved again. A cell whose held-out samples are not finite is
reported as failed and computed again by the next run.

Fields of ``config.fit``: ``methods`` (method specs, e.g. ``tab3``, ``dpmpp2``), ``nfes``,
``budget`` (how ``nfes`` count: ``nfe``, network evaluations per sample, the default, or
``parallel_nfe``, sequential rounds, EPD's count; the same for every sequential method),
``variants``, ``fixed_grids``, ``num_fit`` (train + validation starting points),
``recipes`` (``fit_sampler`` cells: ``auto`` or names of ``deis_jax.fitting.RECIPES``; one cell
per problem and NFE, its file a ``FittedSampler``), ``loss`` and ``fit_dtype`` (the objective
and loop precision of every LD3 fit, ``deis_jax.fitting.ld3``), ``validation_fraction``,
``num_heldout``,
``teacher_points``, ``teacher_grid``,
``teacher_substeps`` / ``heldout_substeps`` (RK4 steps per teacher interval), ``amed``
(variant ``amed``, for AMED and the probe methods EPD/EPD-Plugin/AdaSDE: ``loss``,
``feature_weight``, ``steps``, ``learning_rate``, ``batch_size``, ``patience`` and
``seed``; the feature losses ``features`` / ``features_endpoint`` are for image models: their
feature network is ``config.eval``'s extractor, the one FD / FID uses, so ``config.eval``
must be valid -- with the Inception weights file for ``fid`` -- and the mixtures refuse them;
its teacher is the grid fitter's, ``teacher_points`` and ``teacher_substeps``, with the
student's grid points added), ``max_delta``
(bound of the learned corrections, relative), ``gits_metric``, ``gits_gamma``, ``ld3`` (the
settings of ``deis_jax.fitting.ld3.fit_ld3``), ``plot_nfe``, ``x64``, ``params``, ``fd`` (image
models: also score every cell with ``config.eval``'s metric, as ``--mode=table`` does).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax

from deis_jax.common import checks as cv
from deis_jax.common.identity import fingerprint
from deis_jax.evaluation.metrics import mean_log_prob
from deis_jax.experiments import gmm, validation
from deis_jax.experiments.engine import Cell, Progress, run_cells
from deis_jax.experiments.fit import cells as fitting
from deis_jax.fitting.amed import FEATURE_LOSSES, L2_LOSSES, LEARNED_METHODS
from deis_jax.fitting.amed import LOSSES as AMED_LOSSES
from deis_jax.fitting.gits import METRICS as GITS_METRICS
from deis_jax.fitting.ld3 import LOSSES as LD3_LOSSES
from deis_jax.fitting.recipes import resolve_recipes
from deis_jax.sampling.method_spec import MethodChoice, parse_method_spec
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.sampling.timesteps import GRID_KINDS

BUDGETS = ("nfe", "parallel_nfe")  # config.fit.budget: how config.fit.nfes count
VARIANT_COST = {"gits": 2, "ld3": 20, "ld3+table": 20, "amed": 20}  # bar weights (fixed: 1)


class Plan(NamedTuple):
    schedule: NoiseSchedule
    choices: list[MethodChoice]
    variants: list[str]
    cells: list[Cell]
    fingerprint: str


def validate(config) -> Plan:
    """Check every field (before any work) and lay out the cells."""
    if cv.get_field(config, "data.name") == "gmm":
        schedule = gmm.validate_problem(config)
        problems = gmm.problem_names(config)
    else:
        from deis_jax.models.loading import validate_model_and_data

        schedule = validation.validate_sde(config)
        validation.validate_sampler(config, schedule)
        validate_model_and_data(config)  # (a class-conditional one: config.sampling.labels)
        cv.require_choice(config, "fit.params", ("checkpoint", "random"))
        problems = [config.data.name]
    choices = []
    for text in cv.get_field(config, "fit.methods"):
        try:
            choice = parse_method_spec(text)
        except ValueError as err:
            raise cv.ConfigError(f"config.fit.methods: {err}") from None
        if choice.method in ("sddim", "ersde"):
            raise cv.ConfigError(f"config.fit.methods: {text!r} is stochastic (no ODE grid to fit)")
        choices.append(choice)
    budget = config.fit.get("budget") or "nfe"
    if budget not in BUDGETS:
        raise cv.ConfigError(f"config.fit.budget must be one of {BUDGETS}, got {budget!r}")
    nfes = validation.require_nfe_list(config, "fit.nfes", choices,
                                       parallel=budget == "parallel_nfe")  # fmt: skip
    cv.require_number(config, "fit.plot_nfe", integer=True, minimum=1)
    allowed = ("default",) + tuple(f"fixed:{k}" for k in GRID_KINDS if k != "custom")
    allowed += fitting.FITTED_VARIANTS
    variants = ["default"] + [f"fixed:{k}" for k in cv.get_field(config, "fit.fixed_grids")]
    variants += list(cv.get_field(config, "fit.variants"))
    for v in variants:
        if v not in allowed:
            raise cv.ConfigError(
                f"config.fit.variants / fixed_grids: {v!r} is not one of {allowed}"
            )
    for field in ("num_fit", "num_heldout", "teacher_points"):
        cv.require_number(config, f"fit.{field}", integer=True, minimum=2)
    for field in ("teacher_substeps", "heldout_substeps"):
        cv.require_number(config, f"fit.{field}", integer=True, minimum=1)
    cv.require_number(config, "fit.validation_fraction", minimum=0, maximum=0.9,
                      exclusive_minimum=True)  # fmt: skip
    cv.require_number(config, "fit.max_delta", minimum=0, exclusive_minimum=True)
    cv.require_number(config, "fit.gits_gamma", minimum=0, exclusive_minimum=True)
    cv.require_choice(config, "fit.gits_metric", GITS_METRICS)
    cv.require_choice(config, "fit.teacher_grid", tuple(k for k in GRID_KINDS if k != "custom"))
    cv.require_choice(config, "fit.loss", LD3_LOSSES)
    cv.require_choice(config, "fit.fit_dtype", ("float32", "float64"))
    if "amed" in variants:
        if not any(c.method in LEARNED_METHODS for c in choices):
            raise cv.ConfigError(f"config.fit.variants has 'amed' but config.fit.methods has no "
                                 f"learned-rule method {LEARNED_METHODS}")  # fmt: skip
        for field in ("steps", "patience", "seed"):
            cv.require_number(config, f"fit.amed.{field}", integer=True,
                              minimum=0 if field in ("steps", "seed") else 1)  # fmt: skip
        cv.require_number(config, "fit.amed.learning_rate", minimum=0, exclusive_minimum=True)
        loss = cv.require_choice(config, "fit.amed.loss", AMED_LOSSES)
        if loss in FEATURE_LOSSES:
            if config.data.name == "gmm":
                raise cv.ConfigError(
                    f"config.fit.amed.loss={loss!r} compares final states in the feature space "
                    "of config.eval's image network (FID Inception / digits classifier), which "
                    f"the gmm mixtures do not have; use one of {L2_LOSSES}"
                )
            cv.require_number(config, "fit.amed.feature_weight", minimum=0,
                              exclusive_minimum=True)  # fmt: skip
        batch = cv.get_field(config, "fit.amed.batch_size")
        if batch is not None:
            cv.require_number(config, "fit.amed.batch_size", integer=True, minimum=1)
    recipes = _recipes(config, nfes)
    variants += recipes
    cells = [
        Cell(f"{p}|{c.label}|{n}|{v}", cost=VARIANT_COST.get(v, 1),
             label=f"{p} {c.label} nfe={n} {v}", payload=(p, c, n, v))
        for p in problems for c in choices for n in nfes for v in variants
        if v not in recipes and fitting.applies(c, v)
    ]  # fmt: skip
    cells += [
        Cell(f"{p}|{fitting.FIT_SAMPLER}|{n}|{v}", cost=VARIANT_COST["ld3"] * 4,
             label=f"{p} fit_sampler nfe={n} {v}", payload=(p, None, n, v))
        for p in problems for n in nfes for v in recipes
    ]  # fmt: skip
    if len({c.key for c in cells}) != len(cells):
        raise cv.ConfigError("config.fit.methods / nfes / variants must not repeat")
    return Plan(schedule, choices, variants, cells, fitting.experiment_fingerprint(config))


def _recipes(config, nfes) -> list[str]:
    """The variants ``recipe:<name>`` of ``config.fit.recipes`` (``fit_sampler``'s recipes:
    ``auto`` or names of ``RECIPES``), checked with their settings and every budget."""
    names = list(config.fit.get("recipes") or ())
    if not names:
        return []
    for name in names:
        try:
            resolved = resolve_recipes(name)
        except ValueError as err:
            raise cv.ConfigError(f"config.fit.recipes: {err}") from None
        for recipe in resolved:
            choice = parse_method_spec(f"{recipe.method}{recipe.order}")
            for nfe in nfes:
                afs = recipe.uses_afs(nfe)
                validation.check_budget(config, "fit.nfes", nfe, choice._replace(
                    options={**choice.options, "afs": afs}), "exact")  # fmt: skip
    return [f"{fitting.RECIPE_PREFIX}{name}" for name in names]


# the mixtures' NLL gap: exact data draws from their own key (not the starting points' split)
NLL_DATA_DRAWS = 4096
DATA_SEED_OFFSET = 1001


def make_problem(config, schedule: NoiseSchedule, name: str, model=None) -> fitting.FitProblem:
    """The mixture of ``dim<d>``, or the image ``model`` (a ``LoadedModel``), with its
    starting points (and a class-conditional network's classes of them)."""
    fit_cfg = config.fit
    density = None
    if model is None:
        mixture = gmm.mixture_for_problem(config, name)
        eps_fn, dim = mixture.eps_fn(schedule), mixture.dim
        model_id = gmm.mixture_model_id(config, name)
        shape: tuple[int, ...] = (dim,)
        data = mixture.sample(jax.random.PRNGKey(config.seed + DATA_SEED_OFFSET), NLL_DATA_DRAWS)
        density = fitting.Density(mixture.log_prob, mean_log_prob(mixture.log_prob, data))
    else:
        from deis_jax.models.loading import image_shape

        eps_fn, model_id, shape = model.eps_fn(), fingerprint(model.identity), image_shape(config)
    seed, num_fit, num_heldout = config.seed + 1000, int(fit_cfg.num_fit), int(fit_cfg.num_heldout)
    x_fit, x_heldout = fitting.draw_starting_points(schedule, seed, shape, num_fit, num_heldout)
    labels: tuple = (None, None)
    if model is not None and model.num_classes:
        from deis_jax.models.loading import class_labels_of

        rule = class_labels_of(config, model, seed)
        labels = fitting.draw_labels(rule, num_fit, num_heldout)
    return fitting.FitProblem(name, eps_fn, model_id, x_fit, x_heldout, *labels, density)


def check_inputs(config, workdir: str, plan: Plan) -> None:
    """For an image model: the checkpoint (unless ``fit.params='random'``; its structure
    too: ``verify_sampling_params``), ``config.eval`` (with the Inception weights file) when
    an AMED fit uses a feature loss, and, when the fit is scored by a feature distance
    (``fit.fd``), ``config.eval`` and the FID reference."""
    if config.data.name == "gmm":
        return
    from deis_jax.evaluation import features
    from deis_jax.experiments.scoring import check_reference
    from deis_jax.models.loading import verify_sampling_params

    scored = bool(config.fit.get("fd"))
    if scored or _feature_loss(config, plan):  # the fit's own validation does not read it
        features.validate_eval(config)
    if config.fit.params == "checkpoint":
        verify_sampling_params(config, workdir)
    if scored:
        check_reference(config, workdir)


def run(config, workdir: str, plan: Plan | None = None) -> list[dict]:
    """Run (or resume) the fits and evaluations and write the report; returns the rows."""
    plan = validate(config) if plan is None else plan
    if config.fit.x64:
        jax.config.update("jax_enable_x64", True)
    t0, t1 = plan.schedule.interval(config.sampler.t0, config.sampler.t1)
    names = list(dict.fromkeys(cell.payload[0] for cell in plan.cells))
    model = None
    if config.data.name != "gmm":  # the image model, loaded once for fitting and scoring
        from deis_jax.models.loading import load_model

        model = load_model(config, workdir, plan.schedule, params=config.fit.params)
    problems = {name: make_problem(config, plan.schedule, name, model) for name in names}
    # the cells' identity includes the models' (a resumed run never mixes two checkpoints)
    # and a class-conditional network's classes of the starting points
    identity = fingerprint([plan.fingerprint] + [p.model_id for p in problems.values()]
                           + [p.labels_identity() for p in problems.values()
                              if p.labels_fit is not None])  # fmt: skip
    teachers: dict[str, fitting.Teachers] = {}
    settings = fitting.FitSettings.from_config(config)
    scorer = None
    if config.fit.get("fd") and model is not None:
        scorer = fd_scorer(config, workdir, plan.schedule, model)
    sample_features = None  # the feature loss's network: config.eval's extractor
    if _feature_loss(config, plan) and model is not None:
        from deis_jax.evaluation import features

        sample_features = features.sample_features_from_config(config)

    def compute(cell: Cell, advance: Progress) -> dict:
        name, choice, nfe, variant = cell.payload
        if name not in teachers:  # the 61-point fitting teacher only if a cell fits a grid
            with_fit = any(v in fitting.GRID_VARIANTS or v.startswith(fitting.RECIPE_PREFIX)
                           for v in plan.variants)  # fmt: skip
            teachers[name] = fitting.teachers(settings, problems[name], plan.schedule, t0, t1,
                                              os.path.join(workdir, "teachers"),
                                              with_fit)  # fmt: skip
        record = fitting.compute_cell(settings, plan.schedule, problems[name], teachers[name],
                                      choice, nfe, variant, workdir, scorer=scorer,
                                      features=sample_features)  # fmt: skip
        jax.clear_caches()  # every fit compiles its own programs: keep memory flat over cells
        return record

    os.makedirs(workdir, exist_ok=True)
    nfes, plot_nfe = list(config.fit.nfes), int(config.fit.plot_nfe)

    def report(done: list[dict], plots: bool = False) -> None:  # plots at the end only
        fitting.write_report(workdir, done, plan.variants, nfes, plot_nfe, plots)

    records = list(
        run_cells(
            plan.cells, compute, cache_path=os.path.join(workdir, "results.jsonl"),
            fingerprint=identity, desc="fit",
            verify=lambda record: fitting.artifact_problem(workdir, record,
                                                           problems[record["problem"]]),
            on_record=lambda done: report(list(done.values())),  # a stopped run keeps it
        ).values()
    )  # fmt: skip
    if jax.process_index() == 0:
        report(records, plots=True)
        for row in fitting.summary_rows(records, nfes):
            print(f"{row[0]} NFE {row[1]}: best fixed {row[2]} {row[3]:.3e}, "
                  f"best fitted {row[4]} {row[5]:.3e} ({row[6]:.2f}x)")  # fmt: skip
    return records


def _feature_loss(config, plan: Plan) -> bool:
    """Whether the run's AMED fits use a feature loss (``config.fit.amed.loss``)."""
    return "amed" in plan.variants and config.fit.amed.loss in FEATURE_LOSSES


def fd_scorer(config, workdir: str, schedule: NoiseSchedule, model):
    """The ``--mode=table`` scorer (``config.eval``: FD-digits / FID) of ``model``."""
    from deis_jax.evaluation import features
    from deis_jax.experiments.scoring import SampleScorer

    extractor = features.extractor_from_config(config)
    reference = features.Reference(config, workdir, extractor)
    return SampleScorer.from_config(config, schedule, model, extractor, reference)
