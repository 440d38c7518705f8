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
  log-SNR, loss = mean squared distance between the student's and the teacher's endpoints
  from the same ``x_T``, with a held-out validation split and early stopping; with
  ``learn_table=True`` the method's coefficients get bounded per-step corrections too
  (:mod:`deis_jax.sampling.learned`), fitted jointly with the grid.

The last ``validation_fraction`` of ``x_T`` is the validation split (LD3 stops on it; both
objectives report the init and fitted loss on it). Held-out evaluation -- on ``x_T`` never used
here -- is the caller's job (``--mode=fit`` does it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from deis_jax.fitting import gits, ld3
from deis_jax.fitting.grid_file import OBJECTIVES, OptimizedGrid
from deis_jax.fitting.teacher import Teacher, solve_teacher
from deis_jax.identity import describe_object
from deis_jax.sampling.sampler import SamplingPlan, make_plan, sample
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.sampling.wrappers import EpsFn, model_argument


def endpoint_loss(
    plan: SamplingPlan,
    eps_fn: EpsFn,
    x_T: np.ndarray,
    x0: np.ndarray,
    batch_size: int = 256,
    rule_params=None,
) -> float:
    """Mean squared distance per dimension between ``plan``'s endpoints and ``x0``
    (``rule_params``: a learned rule's parameters, e.g. an AMED predictor's)."""
    run = jax.jit(lambda plan, f, x, p: sample(plan, f, x, rule_params=p), static_argnums=0)
    f = model_argument(eps_fn)
    total = 0.0
    for start in range(0, len(x_T), batch_size):
        out = np.asarray(run(plan, f, x_T[start : start + batch_size], rule_params), np.float64)
        total += float(np.sum((out - x0[start : start + batch_size]) ** 2))
    return total / x0.size


def optimize_grid(
    schedule: NoiseSchedule,
    eps_fn: EpsFn,
    x_T,
    *,
    method: str,
    order: int | None = None,
    nfe: int,
    objective: str = "ld3",
    grid: str | None = None,
    t0: float | None = None,
    t1: float | None = None,
    options: dict | None = None,
    teacher: Teacher | None = None,
    validation_fraction: float = 0.25,
    model_id: str = "",
    learn_table: bool = False,
    max_delta: float = 0.1,
    gits_metric: str = "l2",
    gits_gamma: float = 1.15,
    teacher_points: int = 61,
    teacher_substeps: int = 4,
    ld3_settings: dict[str, Any] | None = None,
    callback: Callable[[int, float, float], None] | None = None,
) -> OptimizedGrid:
    """Fit the grid of ``method`` at ``nfe`` to ``eps_fn`` on the starting points ``x_T``.

    ``grid``/``t0``/``t1``/``options`` are those of ``get_sampler``: the initial grid (LD3
    starts from it) and the interval (both objectives keep its end points). ``teacher``: a
    precomputed teacher on exactly these ``x_T`` (e.g. from ``load_or_solve_teacher``); else
    one is solved here (``teacher_points`` fine points, ``teacher_substeps`` RK4 steps each).
    ``ld3_settings`` are passed to :func:`deis_jax.fitting.ld3.fit_ld3` (steps, learning_rate,
    patience, batch_size, ball, seed). Returns the fitted :class:`OptimizedGrid` with its
    provenance (validation loss of the initial and fitted grid, seconds, teacher settings).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if learn_table and objective != "ld3":
        raise ValueError("learn_table=True needs objective='ld3' (GITS searches grids only)")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    options = dict(options or {})
    plan = make_plan(schedule, method=method, order=order, nfe=nfe, grid=grid, t0=t0, t1=t1,
                     **options)  # fmt: skip
    if plan.stochastic:
        raise ValueError(f"method {method!r} is stochastic: only ODE samplers have a grid to fit")
    x_T = np.asarray(x_T)
    num_val = max(1, int(round(validation_fraction * len(x_T))))
    if len(x_T) - num_val < 1:
        raise ValueError(f"x_T has {len(x_T)} samples: too few to split off a validation set")
    start = time.perf_counter()
    if teacher is None:
        teacher = solve_teacher(
            schedule, eps_fn, x_T, t0=float(plan.ts[-1]), t1=float(plan.ts[0]),
            num_points=teacher_points, substeps=teacher_substeps,
            keep_states=objective == "gits", model_id=model_id,
        )  # fmt: skip
    elif teacher.x_T.shape != x_T.shape or not np.array_equal(teacher.x_T, x_T):
        raise ValueError("teacher was solved from other x_T than the ones given")
    train, val = slice(0, len(x_T) - num_val), slice(len(x_T) - num_val, None)
    init_val = endpoint_loss(plan, eps_fn, x_T[val], teacher.x0[val])
    corrections = None
    fit: dict[str, Any] = {"objective": objective}
    if objective == "gits":
        ts = gits.gits_grid(teacher, schedule, plan.num_steps, metric=gits_metric,
                            gamma=gits_gamma)  # fmt: skip
        fitted = make_plan(schedule, ts, method=method, order=plan.order, **options)
        fit.update(metric=gits_metric, gamma=gits_gamma)
        best_val = endpoint_loss(fitted, eps_fn, x_T[val], teacher.x0[val])
    else:
        settings = dict(ld3_settings or {})
        result = ld3.fit_ld3(
            plan, eps_fn, x_T[train], teacher.x0[train], x_T[val], teacher.x0[val],
            learn_table=learn_table, max_delta=max_delta, callback=callback, **settings,
        )  # fmt: skip
        ts, corrections = result.ts, result.raw
        best_val = float(result.best_val_loss)
        fit.update(settings, learn_table=learn_table, best_step=result.best_step,
                   val_loss_curve=[float(v) for v in result.val_loss])  # fmt: skip
        if learn_table:
            fit["max_delta"] = max_delta
    provenance = {
        "model_id": model_id,
        "init_grid": grid or "default",
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
    return OptimizedGrid(
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
