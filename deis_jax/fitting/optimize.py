"""``optimize_grid``: fit a sampler's time grid (and optionally its table) to a frozen model.

    grid = deis.optimize_grid(schedule, eps_fn, x_T, method="ipndm", order=3, nfe=5,
                              objective="ld3")
    grid.save("ipndm3_nfe5.json")
    sampler = deis.get_sampler(schedule, eps_fn, grid.ts, method="ipndm", order=3)

Both objectives start from the same teacher (:mod:`deis_jax.fitting.teacher`): RK4 solves of
the probability-flow ODE from ``x_T`` on a fine grid over the sampler's interval.

* ``"gits"`` (:mod:`deis_jax.fitting.gits`): dynamic programming over the teacher's fine grid
  with the cost of single DDIM jumps between teacher states; host-side, seconds.
* ``"ld3"`` (:mod:`deis_jax.fitting.ld3`): Adam on a monotone parametrisation of the grid in
  log-SNR, loss = an average over samples of the distance between the student's and the
  teacher's endpoints from the same ``x_T`` (``loss``: ``mse``, ``rms`` or ``trimmed_rms``),
  with a held-out validation split, a decaying rate and early stopping, starting from the
  best fixed grid on the validation split (``grid="best"``); with ``learn_table=True`` the
  method's coefficients get bounded per-step corrections too
  (:mod:`deis_jax.sampling.learned`), fitted jointly with the grid.

For the common case -- which method, which fit, AFS or not -- use
:func:`deis_jax.fitting.fit_sampler`, which tries the recipes that win and keeps the best.

For a class-conditional network ``labels`` gives the class of every row of ``x_T``: the teacher
is solved for them and every fit and measurement passes each row's class with it.

The last ``validation_fraction`` of ``x_T`` is the validation split (LD3 stops on it; both
objectives report the init and fitted loss on it). Held-out evaluation -- on ``x_T`` never used
here -- is the caller's job (``--mode=fit`` does it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.common.identity import describe_object
from deis_jax.fitting import gits, ld3
from deis_jax.fitting.grid_file import OBJECTIVES, OptimizedGrid
from deis_jax.fitting.teacher import Teacher, check_labels, solve_teacher
from deis_jax.sampling.sampler import SamplingPlan, make_plan, sample
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.sampling.wrappers import EpsFn, model_argument


def endpoint_samples(
    plan: SamplingPlan,
    eps_fn: EpsFn,
    x_T: np.ndarray,
    batch_size: int = 256,
    rule_params=None,
    key: jax.Array | None = None,
    labels=None,
) -> np.ndarray:
    """``plan``'s endpoints ``Psi(x_T^b)`` (float64 on the host), in batches of ``batch_size``
    (``rule_params``: a learned rule's parameters, e.g. an AMED predictor's ``RuleParams``;
    ``key``: a stochastic plan's, the noise of row b keyed by its index in ``x_T``, so the
    samples do not depend on ``batch_size``; ``labels``: the class of every row of ``x_T``,
    a class-conditional network)."""
    run = jax.jit(lambda plan, f, x, p, k, offset, c: sample(
        plan, f, x, k, index_offset=offset, rule_params=p, labels=c), static_argnums=0)  # fmt: skip
    f = model_argument(eps_fn)
    out = []
    for start in range(0, len(x_T), batch_size):
        x = x_T[start : start + batch_size]
        c = None if labels is None else jnp.asarray(labels[start : start + batch_size])
        out.append(np.asarray(run(plan, f, x, rule_params, key, start, c), np.float64))
    return np.concatenate(out)


def sample_distances(samples: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """Per sample, the RMS distance per dimension ``|samples^b - x0^b| / sqrt(D)`` (float64,
    shape ``(B,)``)."""
    diff = (np.asarray(samples, np.float64) - np.asarray(x0, np.float64)).reshape(len(samples), -1)
    return np.sqrt(np.mean(diff**2, axis=1))


def endpoint_distances(
    plan: SamplingPlan,
    eps_fn: EpsFn,
    x_T: np.ndarray,
    x0: np.ndarray,
    batch_size: int = 256,
    rule_params=None,
    key: jax.Array | None = None,
    labels=None,
) -> np.ndarray:
    """Per sample, the RMS distance per dimension ``|Psi(x_T^b) - x0^b| / sqrt(D)`` between
    ``plan``'s endpoint and ``x0`` (float64, shape ``(B,)``; the other arguments as
    :func:`endpoint_samples`)."""
    samples = endpoint_samples(plan, eps_fn, x_T, batch_size, rule_params, key, labels)
    return sample_distances(samples, x0)


def objective_value(distances: np.ndarray, loss: str, trim: float = ld3.DEFAULT_TRIM) -> float:
    """``ld3.reduce_losses`` of per-sample distances, on the host in float64."""
    return float(ld3.reduce_losses(jnp.asarray(np.asarray(distances) ** 2), loss, trim))


# The fixed grid kinds an LD3 fit may start from (grid="best"), besides the method's own.
INIT_GRIDS = ("linear", "quadratic", "karras", "log_snr")


def optimize_grid(
    schedule: NoiseSchedule,
    eps_fn: EpsFn,
    x_T,
    *,
    method: str,
    order: int | None = None,
    nfe: int,
    objective: str = "ld3",
    afs: bool = False,
    grid: str | None = "best",
    t0: float | None = None,
    t1: float | None = None,
    options: dict | None = None,
    teacher: Teacher | None = None,
    validation_fraction: float = 0.25,
    model_id: str = "",
    learn_table: bool = False,
    max_delta: float = ld3.DEFAULT_MAX_DELTA,
    loss: str = ld3.DEFAULT_LOSS,
    gits_metric: str = "l2",
    gits_gamma: float = 1.15,
    teacher_points: int = 61,
    teacher_substeps: int = 4,
    ld3_settings: dict[str, Any] | None = None,
    fit_dtype: str | None = None,
    callback: Callable[[int, float, float], None] | None = None,
    labels=None,
) -> OptimizedGrid:
    """Fit the grid of ``method`` at ``nfe`` to ``eps_fn`` on the starting points ``x_T``
    (``labels``: a class-conditional network's class of every row, int ``(n,)``).

    ``afs``: the analytical first step (``make_plan``): the fitted sampler skips the first
    network call and spends its ``nfe`` on one step more (often a large gain at 3-6 NFE).
    ``grid``: where LD3 starts -- a ``GRID_KINDS`` kind, None (the method's default) or
    ``"best"`` (default): the best on the validation split of the method's default grid and
    ``INIT_GRIDS`` (GITS searches its own; its ``grid`` only sets the reported initial
    loss). ``t0``/``t1``/``options`` are those of ``get_sampler`` (both objectives keep the
    interval's ends). ``teacher``: a precomputed teacher on exactly these ``x_T`` (e.g. from
    ``load_or_solve_teacher``); else one is solved here (``teacher_points`` fine points,
    ``teacher_substeps`` RK4 steps each). ``learn_table``: LD3 also fits bounded corrections
    of the coefficients (``max_delta``, ``deis_jax.sampling.learned``). ``loss``: the LD3
    objective over samples (``ld3.LOSSES``: ``mse``, ``rms``, ``trimmed_rms``), also what
    ``grid="best"`` compares. ``ld3_settings`` go to :func:`deis_jax.fitting.ld3.fit_ld3`
    (steps, learning_rate, final_lr_fraction, patience, batch_size, ball, seed).
    ``fit_dtype``: the precision of the LD3 loop (e.g. ``"float32"``: about half the time of
    float64 at 3072-D); default the dtype of ``x_T``. The teacher, the initial-grid choice and
    the reported losses stay in ``x_T``'s precision, and the grid is recomputed in float64
    from the fitted logits either way. Returns the
    fitted :class:`OptimizedGrid` with its provenance (validation loss of the initial and
    fitted grid, seconds, teacher settings).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if learn_table and objective != "ld3":
        raise ValueError("learn_table=True needs objective='ld3' (GITS searches grids only)")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    if loss not in ld3.LOSSES:
        raise ValueError(f"loss must be one of {ld3.LOSSES}, got {loss!r}")
    options = dict(options or {})
    if "afs" in options:
        if bool(options.pop("afs")) != bool(afs):
            raise ValueError("give afs as the argument afs=..., not in options")
    if afs:
        options["afs"] = True  # an OptimizedGrid carries AFS among its options
    candidates = _initial_grids(grid if objective == "ld3" else (grid if grid != "best"
                                                                   else None))  # fmt: skip
    plans = {kind: make_plan(schedule, method=method, order=order, nfe=nfe, grid=kind, t0=t0,
                             t1=t1, **options) for kind in candidates}  # fmt: skip
    plan = next(iter(plans.values()))
    if plan.stochastic:
        raise ValueError(f"method {method!r} is stochastic: only ODE samplers have a grid to fit")
    x_T = np.asarray(x_T)
    labels = None if labels is None else check_labels(labels, len(x_T))
    num_val = max(1, int(round(validation_fraction * len(x_T))))
    if len(x_T) - num_val < 1:
        raise ValueError(f"x_T has {len(x_T)} samples: too few to split off a validation set")
    start = time.perf_counter()
    if teacher is None:
        teacher = solve_teacher(
            schedule, eps_fn, x_T, t0=float(plan.ts[-1]), t1=float(plan.ts[0]),
            num_points=teacher_points, substeps=teacher_substeps,
            keep_states=objective == "gits", model_id=model_id, labels=labels,
        )  # fmt: skip
    else:
        check_teacher(teacher, x_T, labels)
    train, val = slice(0, len(x_T) - num_val), slice(len(x_T) - num_val, None)
    c_train, c_val = (None, None) if labels is None else (labels[train], labels[val])
    init_losses = {
        kind or "default": objective_value(
            endpoint_distances(p, eps_fn, x_T[val], teacher.x0[val], labels=c_val), loss)
        for kind, p in plans.items()
    }  # fmt: skip
    init_kind = min(init_losses, key=init_losses.get)
    plan = plans[None if init_kind == "default" else init_kind]
    init_val = init_losses[init_kind]
    corrections = None
    fit: dict[str, Any] = {"objective": objective, "loss": loss}
    if objective == "gits":
        ts = gits.gits_grid(teacher, schedule, plan.num_steps, metric=gits_metric,
                            gamma=gits_gamma)  # fmt: skip
        fitted = make_plan(schedule, ts, method=method, order=plan.order, **options)
        fit.update(metric=gits_metric, gamma=gits_gamma)
        best_val = objective_value(endpoint_distances(fitted, eps_fn, x_T[val],
                                                      teacher.x0[val], labels=c_val),
                                   loss)  # fmt: skip
    else:
        settings = dict(ld3_settings or {})
        dtype = x_T.dtype if fit_dtype is None else np.dtype(fit_dtype)
        x_fit, x0_fit = x_T.astype(dtype), np.asarray(teacher.x0).astype(dtype)
        result = ld3.fit_ld3(
            plan, eps_fn, x_fit[train], x0_fit[train], x_fit[val], x0_fit[val],
            learn_table=learn_table, max_delta=max_delta, loss=loss, callback=callback,
            labels_train=c_train, labels_val=c_val, **settings,
        )  # fmt: skip
        ts, corrections = result.ts, result.raw
        best_val = float(result.best_val_loss)
        fit.update(settings, learn_table=learn_table, best_step=result.best_step,
                   fit_dtype=str(dtype),
                   steps_run=len(result.train_loss), improved=result.improved,
                   val_loss_curve=[float(v) for v in result.val_loss])  # fmt: skip
        if learn_table:
            fit["max_delta"] = max_delta
    provenance = {
        "model_id": model_id,
        "init_grid": init_kind,
        "init_val_losses": init_losses,
        "init_ts": [float(t) for t in plan.ts],
        "num_train": train.stop,
        "num_val": num_val,
        "val_loss_init": init_val,
        "val_loss_fitted": best_val,
        "seconds": time.perf_counter() - start,
        "teacher": teacher.settings,
        "teacher_error_estimate": teacher.error_estimate,
        "fit": fit,
    }
    fitted = OptimizedGrid(
        ts=np.asarray(ts, np.float64),
        method=method,
        order=plan.order,
        nfe=plan.nfe,
        options=options,
        schedule=describe_object(schedule),
        objective=objective,
        corrections=corrections,
        max_delta=max_delta if corrections is not None else None,
        provenance=provenance,
    )
    if objective == "ld3" and fit["fit_dtype"] != str(x_T.dtype):
        # the fitted loss in the precision of the initial one (the loop ran in fit_dtype)
        provenance["val_loss_fitted"] = objective_value(
            endpoint_distances(fitted.plan(schedule), eps_fn, x_T[val], teacher.x0[val],
                               labels=c_val), loss)  # fmt: skip
    return fitted


def check_teacher(teacher: Teacher, x_T: np.ndarray, labels) -> None:
    """``ValueError`` unless ``teacher`` was solved from exactly ``x_T`` and ``labels``."""
    if teacher.x_T.shape != x_T.shape or not np.array_equal(teacher.x_T, x_T):
        raise ValueError("teacher was solved from other x_T than the ones given")
    ours, theirs = labels is not None, teacher.labels is not None
    if ours != theirs or (ours and not np.array_equal(teacher.labels, labels)):
        raise ValueError("teacher was solved for other class labels than the ones given")


def _initial_grids(grid: str | None) -> tuple[str | None, ...]:
    """The grid kinds to start from: ``grid`` itself, or for ``"best"`` the method's default
    (None) and ``INIT_GRIDS``."""
    return (None,) + INIT_GRIDS if grid == "best" else (grid,)
