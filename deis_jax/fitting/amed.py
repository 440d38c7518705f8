"""Train an AMED predictor by distillation, and keep it in one file with its sampling settings.

    plan = make_plan(schedule, method="amed_ipndm", nfe=5, afs=True, scale_time=0.2)
    teacher = amed_teacher(plan, eps_fn, x_T, path="teachers/amed.npz", model_id=...)
    fit = fit_amed(plan, eps_fn, teacher, steps=200)          # Adam, validation, resumable
    fit.predictor.save("amed_ipndm3_nfe5.json")              # method, NFE, AFS, grid, params
    x0 = sample(plan, eps_fn, x_T, rule_params=fit.params)

**Teacher.** The grid fitter's teacher (``deis_jax.fitting.teacher``: RK4 in rho on 61 points
uniform in log-SNR, 4 substeps each, cached) with the student's grid points added to its fine
grid (:func:`teacher_grid`), so it is as accurate as the grid fitter's (an error estimate near
1e-8 on the mixtures, where a teacher on the student's grid refined 8 times was 1e-3 off) and
its states at the student's points -- the targets -- are exact nodes; only those are kept.
The ``endpoint`` loss needs no states at all: any teacher of the same ``x_T`` serves, e.g. the
one :func:`deis_jax.fitting.fit_sampler` shares between every recipe.

**Loss** (squared L2 distance to the teacher's points per sample, averaged over dimensions),
``loss=``:

* ``teacher_forced`` (one-step students ``amed``, ``amed_ddim``, ``amed_dpm``; AMED's loss):
  step k starts from the teacher's state at ``t_k`` and is compared with the teacher's at
  ``t_{k+1}``, summed over the steps -- the sum of the paper's per-interval losses;
* ``trajectory`` (AMED's loss for multistep students): the student rolls out its own
  trajectory (history carried) and is compared at every grid point, summed;
* ``endpoint``: the rollout compared at its final point only (LD3's objective);
* ``features`` (the EPD / AdaSDE papers' loss, specs/epd_adasde.md section 0, 1.5, 2.4): the
  rollout compared with the teacher's states in L2 at every grid point but the last, and its
  final state in the feature space of a differentiable network ``phi``
  (``feature_fn``, model-space samples -> features), weighted by ``feature_weight`` (the
  papers' alpha: 10 for EPD, 20-50 for AdaSDE)::

      loss_b = sum_{k<N} |x_k - y_k|^2 / D  +  alpha * |phi(x_N) - phi(y_N)|^2 / F

  (x_k the student's state at grid point k of N, y_k the teacher's, D the state's and F the
  feature's size; phi(y_N) is a constant). For images ``phi`` is ``config.eval``'s extractor
  on the pixels the metric scores, unrounded (``deis_jax.evaluation.features``): the FID
  Inception's pool_3, or the digits classifier. The papers' L2 is a sum over pixels and
  their final term ``alpha * |.|^2 / F`` broadcast over every pixel, i.e. both are ``D``
  times these terms: the same ratio;
* ``features_endpoint``: the final term alone, ``alpha * |phi(x_N) - phi(y_N)|^2 / F``
  (EPD-Solver's regime on pixel models at NFE 3 / 5 / 7, where only that term is
  backpropagated; like ``endpoint`` it needs the teacher's endpoints only). With
  ``phi`` the identity and ``alpha = 1`` it is ``endpoint`` (and ``features`` is
  ``trajectory``);
* ``auto`` (default): ``teacher_forced`` for one-step students, ``endpoint`` for the
  multistep ``amed_ipndm``. On the 64-D mixture at NFE 7 the iPNDM plugin trained on
  ``trajectory`` reached a held-out RMSE of 0.030-0.044 (worse than plain iPNDM's 0.021: the
  early, large-noise points dominate the sum) and 0.014 on ``endpoint``; for AMED-Solver
  the teacher-forced loss was as good or better (0.030 against 0.036 at NFE 7).

**Class labels.** For a class-conditional network the teacher carries each trajectory's class
(``amed_teacher(..., labels=...)``, ``Teacher.labels``); every loss evaluation passes the
labels of its rows -- the minibatch's, indexed with its ``x_T`` -- to the student's network
calls (``sample(..., labels=...)``).

The paper takes one Adam step per interval and detaches the rollout between intervals; here
one step on the whole loss is taken, gradients flowing through the rollout (the same
stationary points for the teacher-forced students).
The loop is :func:`deis_jax.fitting.adam_loop.fit_adam` (the one LD3 uses): minibatches,
global-norm clipping, validation early stopping (the best-validation predictor is returned,
never worse than the initial ``r = 1/2`` one on the validation set), non-finite updates
skipped, resumable from ``state_path``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.common.identity import array_digest, describe_object
from deis_jax.fitting.adam_loop import LoopResult, fit_adam
from deis_jax.fitting.fitted_file import FittedFile
from deis_jax.fitting.teacher import Teacher, load_or_solve_teacher
from deis_jax.sampling.amed_predictor import (
    init_predictor,
    predictor_from_settings,
    predictor_settings,
)
from deis_jax.sampling.rule_params import RuleParams, signature
from deis_jax.sampling.sampler import SamplingPlan, make_plan, run_table
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.sampling.solvers.amed import AMED_METHODS, amed_options
from deis_jax.sampling.solvers.probe import INITS, PROBE_METHODS, probe_options
from deis_jax.sampling.timesteps import time_grid
from deis_jax.sampling.wrappers import EpsFn, eps_with_features, model_argument

LEARNED_METHODS = AMED_METHODS + PROBE_METHODS


def check_amed_plan(plan: SamplingPlan) -> None:
    """A plan whose rule this module trains: AMED's predictor or the probe tables of EPD /
    EPD-Plugin / AdaSDE (``deis_jax.sampling.solvers.probe``)."""
    if plan.method not in LEARNED_METHODS or plan.rule is None:
        raise ValueError(f"a learned rule needs one of the methods {LEARNED_METHODS}, got "
                         f"{plan.method!r}")  # fmt: skip


def rule_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of ``method`` with its rule's defaults filled in."""
    opts = {k: v for k, v in options.items() if k != "afs"}
    return probe_options(method, opts) if method in PROBE_METHODS else amed_options(opts)


def rule_settings(rule) -> dict[str, Any]:
    """What a rule's parameter shapes depend on: AMED's ``predictor_settings`` or the probe
    tables' ``settings()`` (kind ``probe``)."""
    return rule.settings() if hasattr(rule, "settings") else predictor_settings(rule.predictor)


# --- the teacher ----------------------------------------------------------------------------


def teacher_grid(plan: SamplingPlan, num_points: int = 61) -> np.ndarray:
    """The grid fitter's fine grid -- ``num_points`` uniform in log-SNR over the plan's
    interval (``optimize_grid``'s teacher) -- with the student's grid points added, so that
    the teacher's states include them exactly and its accuracy is the grid fitter's."""
    fine = time_grid(plan.schedule, num_points - 1, "log_snr", t0=float(plan.ts[-1]),
                     t1=float(plan.ts[0]))  # fmt: skip
    return np.unique(np.concatenate([fine, np.asarray(plan.ts, np.float64)]))[::-1].copy()


def amed_teacher(
    plan: SamplingPlan,
    eps_fn: EpsFn,
    x_T,
    *,
    path: str,
    model_id: str,
    num_points: int = 61,
    substeps: int = 4,
    batch_size: int | None = None,
    labels=None,
) -> Teacher:
    """The cached teacher of ``x_T`` for ``plan``'s student: the grid fitter's teacher
    (``num_points`` in log-SNR, ``substeps`` RK4 steps each) on :func:`teacher_grid`, with
    its states kept at the student's grid points only (``labels``: the class of every row of
    ``x_T``, a class-conditional network)."""
    return load_or_solve_teacher(path, plan.schedule, eps_fn, x_T, model_id=model_id,
                                 ts=teacher_grid(plan, num_points), substeps=substeps,
                                 keep_states=True, state_ts=plan.ts,
                                 batch_size=batch_size, labels=labels)  # fmt: skip


def student_targets(plan: SamplingPlan, teacher: Teacher) -> np.ndarray:
    """The teacher's states at the student's grid points ``ts[1:]``: ``(n, N, ...)``.
    ``ValueError`` unless the teacher's grid contains the student's grid exactly."""
    if teacher.states is None:
        raise ValueError("the teacher has no states (solve it with keep_states=True)")
    index = {float(t): i for i, t in enumerate(teacher.ts)}
    missing = [float(t) for t in plan.ts if float(t) not in index]
    if missing:
        raise ValueError(f"the teacher's grid does not contain the student's grid points "
                         f"{missing[:4]} (solve it on teacher_grid(plan))")  # fmt: skip
    return teacher.states[:, [index[float(t)] for t in plan.ts[1:]]]


# --- the loss -------------------------------------------------------------------------------


L2_LOSSES = ("auto", "teacher_forced", "trajectory", "endpoint")
FEATURE_LOSSES = ("features", "features_endpoint")  # need feature_fn
LOSSES = L2_LOSSES + FEATURE_LOSSES
DEFAULT_FEATURE_WEIGHT = 10.0  # EPD's alpha (specs/epd_adasde.md section 1.5)


def check_feature_fn(loss: str, feature_fn, feature_weight: float = DEFAULT_FEATURE_WEIGHT):
    """``ValueError`` unless ``feature_fn`` is given exactly for the feature losses (and
    their ``feature_weight`` is a positive number)."""
    if loss in FEATURE_LOSSES:
        if feature_fn is None:
            raise ValueError(
                f"loss={loss!r} compares the final states in a feature space: pass feature_fn "
                "(model-space samples -> features, e.g. "
                "deis_jax.evaluation.features.sample_features(extractor, centered).fn)"
            )
        if not (np.isfinite(feature_weight) and feature_weight > 0):
            raise ValueError(f"feature_weight must be a positive number, got {feature_weight!r}")
    elif feature_fn is not None:
        raise ValueError(f"feature_fn is for the losses {FEATURE_LOSSES}, not loss={loss!r} "
                         "(an L2 loss has no feature space)")  # fmt: skip


def resolve_loss(plan: SamplingPlan, loss: str) -> str:
    """``loss`` checked against the plan (``auto`` resolved; see the module docstring)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    multistep = plan.table.history > 0
    if loss == "auto":
        return "endpoint" if multistep else "teacher_forced"
    if loss == "teacher_forced" and multistep:
        raise ValueError(f"loss='teacher_forced' is for one-step students; {plan.method!r} "
                         "carries a history (use 'trajectory' or 'endpoint')")  # fmt: skip
    return loss


def per_sample_loss(
    plan: SamplingPlan,
    params,
    eps_fn: EpsFn,
    x_T,
    targets,
    loss: str = "auto",
    key: jax.Array | None = None,
    sample_index: jax.Array | None = None,
    labels: jax.Array | None = None,
    *,
    feature_fn: Callable[[jax.Array], jax.Array] | None = None,
    feature_weight: float = DEFAULT_FEATURE_WEIGHT,
) -> jax.Array:
    """The distillation loss per sample (B,) (module docstring): ``|x^student - x^teacher|^2
    / D`` at the steps' ends, teacher-forced, along the rollout or at its end; the feature
    losses replace the last term by ``feature_weight * |phi(x^student) - phi(x^teacher)|^2
    / F`` with ``phi = feature_fn`` (required for them, refused for the others). A stochastic
    student (AdaSDE) takes ``key`` and the rows' global ``sample_index``: its noise is the
    sampler's per-sample noise, so each training start keeps its noise across updates.
    ``labels``: the rows' classes (a class-conditional network)."""
    loss = resolve_loss(plan, loss)
    check_feature_fn(loss, feature_fn, feature_weight)
    dtype = x_T.dtype
    targets = jnp.asarray(targets, dtype)
    n = plan.num_steps

    def err(a, b):
        return jnp.mean((a - b).reshape(a.shape[0], -1) ** 2, axis=1)

    def feature_err(a, b):  # the teacher's features are constants
        fa, fb = feature_fn(a), jax.lax.stop_gradient(feature_fn(b))
        return (feature_weight * err(fa, fb)).astype(dtype)

    run = functools.partial(run_table, eps_fn, structure=plan.structure, rule=plan.rule,
                            rule_params=params, first_eps_scale=plan.first_eps_scale,
                            key=key, sample_index=sample_index, labels=labels)  # fmt: skip
    if loss == "endpoint":
        return err(run(plan.table, x_T), targets[:, -1])
    if loss == "features_endpoint":
        return feature_err(run(plan.table, x_T), targets[:, -1])
    if loss in ("trajectory", "features"):
        _, states = run(plan.table, x_T, trajectory=True)
        total = sum(err(states[k + 1], targets[:, k]) for k in range(n - 1))
        last = err if loss == "trajectory" else feature_err
        return total + last(states[n], targets[:, n - 1])
    starts = [x_T] + [targets[:, k] for k in range(n - 1)]
    total = 0.0
    for k in range(n):
        row = jax.tree.map(lambda a, k=k: a[k : k + 1], plan.table)
        total = total + err(run(row, starts[k], first_step=k), targets[:, k])
    return total


def _mean_loss(plan, loss, feature_weight, params, eps_fn, x_T, targets, key=None,
               sample_index=None, labels=None, feature_fn=None):  # fmt: skip
    return jnp.mean(per_sample_loss(plan, params, eps_fn, x_T, targets, loss, key, sample_index,
                                    labels, feature_fn=feature_fn,
                                    feature_weight=feature_weight))  # fmt: skip


_loss_and_grad = jax.jit(jax.value_and_grad(_mean_loss, argnums=3), static_argnums=(0, 1, 2))
_loss = jax.jit(_mean_loss, static_argnums=(0, 1, 2))


def init_params(plan: SamplingPlan, eps_fn: EpsFn, x_T, seed: int = 0, init: str = "neutral",
                labels=None):  # fmt: skip
    """Fresh predictor parameters: zero logits (``r = 1/2``, ``c = a = 1``) for the stepwise
    predictor; AMED's initialisation for the bottleneck one, its input width read off the
    network's feature (``eps_with_features``, with the first row's class of ``labels`` for a
    class-conditional network) without running it; the probe tables' ``init``
    (``neutral``: the base step; ``normal``: the papers' N(0, 1) draw)."""
    check_amed_plan(plan)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if hasattr(plan.rule, "init_params"):
        return plan.rule.init_params(seed, init)
    if init != "neutral":
        raise ValueError(f"init={init!r} is for the probe methods {PROBE_METHODS}; AMED "
                         "predictors start from their own initialisation ('neutral')")  # fmt: skip
    key = jax.random.PRNGKey(seed)
    if not plan.rule.needs_features:
        return init_predictor(plan.rule.predictor, key)
    x = jnp.asarray(np.asarray(x_T)[:1])
    t = jnp.asarray(plan.ts[0], x.dtype)
    first = None if labels is None else jnp.asarray(np.asarray(labels)[:1])
    shape = jax.eval_shape(lambda x: eps_with_features(eps_fn, x, t, first)[1], x).shape
    return init_predictor(plan.rule.predictor, key, int(np.prod(shape[1:])))


# --- the file -------------------------------------------------------------------------------


def _to_lists(tree):
    return jax.tree.map(lambda a: np.asarray(a).tolist(), flax.serialization.to_state_dict(tree))


@dataclasses.dataclass(frozen=True, eq=False)
class AmedPredictorFile(FittedFile):
    """A trained predictor with every sampling setting it needs: the method (AMED-Solver or
    the plugin's base), order, options (predictor kind and head ranges), AFS, NFE, schedule
    and grid. ``plan(schedule)`` rebuilds the sampling plan, ``params`` are the predictor's
    (``sample(plan, eps_fn, x_T, rule_params=params)``).

    The file (:meth:`save`) holds the ``sha256`` of its content
    (``deis_jax.common.files.record_sha256``): :meth:`load` refuses a file damaged or edited after
    it was written, naming it. A file without the entry (written by hand or by an older
    deis_jax) is read unchecked."""

    FORMAT = "deis_jax.AmedPredictor"
    FORMAT_VERSION = 1
    KIND = "AMED predictor file"
    REMEDY = (
        'train it again with --mode=fit (variant "amed"), or delete its "sha256" entry to use '
        "a file edited on purpose"
    )
    FITTED = "trained"

    ts: np.ndarray
    method: str
    order: int
    nfe: int
    afs: bool
    options: dict
    schedule: dict
    predictor: dict  # predictor_settings(...)
    params: Any
    provenance: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: SamplingPlan, params, provenance: dict | None = None):
        check_amed_plan(plan)
        return cls(np.asarray(plan.ts, np.float64), plan.method, plan.order, plan.nfe, plan.afs,
                   rule_options(plan.method, plan.options), describe_object(plan.schedule),
                   rule_settings(plan.rule),
                   jax.tree.map(np.asarray, params), dict(provenance or {}))  # fmt: skip

    def settings(self) -> dict[str, Any]:
        return {"method": self.method, "order": self.order, "nfe": self.nfe, "afs": self.afs,
                "options": dict(self.options), "schedule": self.schedule,
                "t0": float(self.ts[-1]), "t1": float(self.ts[0])}  # fmt: skip

    def check_compatible(self, schedule: NoiseSchedule, *, method: str, order: int, nfe: int,
                         options: dict | None = None, t0: float | None = None,
                         t1: float | None = None) -> None:  # fmt: skip
        """Raise ``ValueError`` naming every setting that differs from the trained ones
        (``options`` may carry ``afs``; t0/t1 None: the schedule's defaults)."""
        options = dict(options or {})
        afs = bool(options.pop("afs", False))
        t0, t1 = schedule.interval(t0, t1)
        wanted = {"method": method, "order": order, "nfe": nfe, "afs": afs,
                  "options": rule_options(method, options),
                  "schedule": describe_object(schedule),
                  "t0": t0, "t1": t1}  # fmt: skip
        self.refuse_other(wanted)

    def plan(self, schedule: NoiseSchedule) -> SamplingPlan:
        if describe_object(schedule) != self.schedule:
            raise ValueError(f"the AMED predictor was trained for schedule {self.schedule}, "
                             f"not {schedule}")  # fmt: skip
        plan = make_plan(schedule, self.ts, method=self.method, order=self.order, afs=self.afs,
                         **self.options)  # fmt: skip
        if plan.nfe != self.nfe or rule_settings(plan.rule) != self.predictor:
            raise ValueError(
                "the AMED predictor file does not match its own settings "
                f"(NFE {plan.nfe} vs {self.nfe}, predictor "
                f"{rule_settings(plan.rule)} vs {self.predictor})"
            )
        return plan

    def rule_params(self) -> RuleParams:
        """The predictor's parameters as JAX arrays, with the settings they were trained for
        (``sample`` refuses them for a plan with other settings)."""
        trained_for = signature(method=self.method, order=self.order, nfe=self.nfe,
                                afs=self.afs, options=self.options, schedule=self.schedule,
                                ts=self.ts)  # fmt: skip
        return RuleParams(jax.tree.map(jnp.asarray, self.params), trained_for)

    # --- the file (deis_jax.fitting.fitted_file) -----------------------------------------
    def fields(self) -> dict[str, Any]:
        return {
            "method": self.method, "order": self.order, "nfe": self.nfe, "afs": self.afs,
            "options": self.options, "schedule": self.schedule,
            "ts": [float(t) for t in self.ts], "predictor": self.predictor,
            "params_dtype": str(jax.tree.leaves(self.params)[0].dtype),
            "params": _to_lists(self.params), "provenance": self.provenance,
        }  # fmt: skip

    @classmethod
    def from_fields(cls, record: dict[str, Any]) -> AmedPredictorFile:
        dtype = np.dtype(record["params_dtype"])
        params = jax.tree.map(lambda v: np.asarray(v, dtype), record["params"],
                              is_leaf=lambda v: isinstance(v, list))  # fmt: skip
        if record["predictor"].get("kind") == "probe":
            _check_probe_tables(record["predictor"], params)
        else:
            predictor_from_settings(record["predictor"])
        return cls(np.asarray(record["ts"], np.float64), record["method"],
                   int(record["order"]), int(record["nfe"]), bool(record["afs"]),
                   dict(record["options"]), dict(record["schedule"]),
                   dict(record["predictor"]), params, dict(record["provenance"]))  # fmt: skip


def _check_probe_tables(settings: dict[str, Any], params) -> None:
    """Probe tables are ``[num_steps, probes]`` arrays (``ValueError`` naming one that is not)."""
    shape = (int(settings["num_steps"]), int(settings["probes"]))
    for name, value in params.items():
        if np.shape(value) != shape:
            raise ValueError(f"params.{name} has shape {np.shape(value)}, not {shape}")


# --- training -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class AmedFit:
    """:func:`fit_amed`'s result: the best-validation parameters (:class:`RuleParams`, for
    ``sample(plan, eps_fn, x_T, rule_params=fit.params)``), the loop's record, and the file to
    save."""

    params: Any
    loop: LoopResult
    predictor: AmedPredictorFile


def fit_amed(
    plan: SamplingPlan,
    eps_fn: EpsFn,
    teacher: Teacher,
    *,
    loss: str = "auto",
    validation_fraction: float = 0.25,
    steps: int = 200,
    learning_rate: float = 5e-3,
    batch_size: int | None = 32,
    patience: int = 40,
    clip_norm: float = 1.0,
    eval_every: int = 1,
    seed: int = 0,
    state_path: str | None = None,
    checkpoint_every: int = 25,
    model_id: str = "",
    callback: Callable[[int, float, float | None], None] | None = None,
    progress: Callable[[int], None] | None = None,
    init: str = "neutral",
    feature_fn: Callable[[jax.Array], jax.Array] | None = None,
    feature_id: str = "",
    feature_weight: float = DEFAULT_FEATURE_WEIGHT,
) -> AmedFit:
    """Train ``plan``'s predictor on ``teacher`` with ``loss`` (``LOSSES``, module
    docstring). The feature losses need ``feature_fn`` (model-space samples -> features; a
    ``jax.tree_util.Partial`` keeps a network's weights arguments of the compiled step) and
    its ``feature_weight``; a resumable fit of them (``state_path``) also ``feature_id``,
    naming the feature network (and its weights) in the state's identity, so that a state
    fitted with another loss or feature network is not resumed. ``feature_fn`` is refused for
    the L2 losses. The teacher's last ``validation_fraction`` of its starting points are held out
    for early stopping (at least one; the same split as ``optimize_grid``), the rest drive
    Adam(``learning_rate``, AMED's 5e-3) in minibatches of ``batch_size`` (None: all). The
    ``endpoint`` loss needs only the teacher's endpoints (any teacher of these ``x_T``, e.g.
    the grid fitter's); the others need its states at the student's grid points
    (:func:`amed_teacher`). ``state_path`` makes the fit resumable (a killed fit continues
    from its last checkpoint, written every ``checkpoint_every`` updates, and ends with the
    same predictor as an uninterrupted fit); ``model_id`` names the network in its identity.
    ``init``: the probe tables' start (:func:`init_params`). A stochastic student (AdaSDE)
    draws its noise from ``PRNGKey(seed)`` by global row (training rows ``0..``, validation
    rows after them): the same noise for a row at every update (common random numbers, so
    the validation loss is a deterministic function of the parameters). A class-conditional
    network's classes are the teacher's ``labels``, indexed with its rows."""
    check_amed_plan(plan)
    loss = resolve_loss(plan, loss)
    check_feature_fn(loss, feature_fn, feature_weight)
    with_features = loss in FEATURE_LOSSES
    if with_features and state_path is not None and not feature_id:
        raise ValueError(f"a resumable fit (state_path) with loss={loss!r} needs feature_id, "
                         "naming the feature network and its weights in the state's "
                         "identity")  # fmt: skip
    feature_weight = float(feature_weight) if with_features else DEFAULT_FEATURE_WEIGHT
    phi = model_argument(feature_fn) if with_features else None
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    start = time.perf_counter()
    x_T = np.asarray(teacher.x_T)
    # the endpoint losses read targets[:, -1] only: the teacher's x0
    endpoint_only = loss in ("endpoint", "features_endpoint")
    targets = teacher.x0[:, None] if endpoint_only else student_targets(plan, teacher)
    num_val = max(1, int(round(validation_fraction * len(x_T))))
    if num_val >= len(x_T):
        raise ValueError(f"need at least 2 teacher trajectories, got {len(x_T)}")
    num_train = len(x_T) - num_val
    val_x, val_y = jnp.asarray(x_T[num_train:]), jnp.asarray(targets[num_train:])
    train_x, train_y = jnp.asarray(x_T[:num_train]), jnp.asarray(targets[:num_train])
    labels = teacher.labels  # a class-conditional network: each trajectory's class
    train_c = val_c = None
    if labels is not None:
        train_c, val_c = jnp.asarray(labels[:num_train]), jnp.asarray(labels[num_train:])
    f = model_argument(eps_fn)
    params = init_params(plan, eps_fn, x_T, seed, init, labels)
    key = jax.random.PRNGKey(seed) if plan.stochastic else None
    val_index = jnp.arange(num_train, len(x_T)) if plan.stochastic else None

    def loss_and_grads(p, idx):
        index = jnp.asarray(idx) if plan.stochastic else None
        rows = None if train_c is None else train_c[idx]  # the minibatch's classes
        value, grads = _loss_and_grad(plan, loss, feature_weight, p, f, train_x[idx],
                                      train_y[idx], key, index, rows, phi)  # fmt: skip
        return value, None, grads

    def val_loss(p) -> float:
        return float(_loss(plan, loss, feature_weight, p, f, val_x, val_y, key, val_index, val_c,
                           phi))  # fmt: skip

    identity = {"model": model_id, "plan": _plan_identity(plan), "loss": loss, "init": init,
                "teacher": teacher.settings.get("x_T_sha256"),
                "targets": array_digest(targets[:, -1])}  # fmt: skip
    if with_features:  # (absent otherwise: the states of the L2 losses keep their identity)
        identity.update(features=feature_id, feature_weight=feature_weight)
    if labels is not None:  # (likewise for unconditional fits)
        identity["labels"] = teacher.settings.get("labels_sha256")
    identity = json.dumps(identity, sort_keys=True)
    setup_seconds = time.perf_counter() - start  # this call's; the loop's are summed over runs
    loop = fit_adam(loss_and_grads, val_loss, params, len(train_x), steps=steps,
                    learning_rate=learning_rate, batch_size=batch_size, patience=patience,
                    clip_norm=clip_norm, eval_every=eval_every, seed=seed, callback=callback,
                    state_path=state_path, state_fingerprint=identity, progress=progress,
                    checkpoint_every=checkpoint_every,
                    name="amed")  # fmt: skip
    provenance = {
        "objective": "amed-distillation", "loss": loss, "model_id": model_id,
        **({"features": feature_id, "feature_weight": feature_weight} if with_features else {}),
        "teacher": {k: teacher.settings.get(k) for k in ("solver", "substeps", "num_points")},
        "teacher_error_estimate": teacher.error_estimate,
        "num_train": len(train_x), "num_val": num_val, "steps_run": len(loop.train_loss),
        "best_step": loop.best_step, "val_loss_init": loop.init_val_loss,
        "val_loss_fitted": loop.best_val_loss, "seconds": setup_seconds + loop.seconds,
        "settings": {"learning_rate": learning_rate, "batch_size": batch_size, "init": init,
                     "patience": patience, "clip_norm": clip_norm, "seed": seed,
                     "validation_fraction": validation_fraction},
        "val_loss_curve": [float(v) for v in loop.val_loss],
    }  # fmt: skip
    return AmedFit(RuleParams.for_plan(plan, loop.params), loop,
                   AmedPredictorFile.from_plan(plan, loop.params, provenance))  # fmt: skip


def _plan_identity(plan: SamplingPlan) -> dict:
    return {
        "method": plan.method,
        "order": plan.order,
        "options": plan.options,
        "afs": plan.afs,
        "ts": [float(t) for t in plan.ts],
        "schedule": describe_object(plan.schedule),
    }
