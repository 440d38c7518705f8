"""High-accuracy reference solves of the probability-flow ODE, validated by refinement.

The reference for a starting point ``x_T`` is classical RK4 in rho (``rhork`` with the
``rk4`` tableau, fourth order) on a log-SNR grid of ``steps`` steps -- small relative steps in
rho everywhere, including near ``t0`` where eps changes fastest. It is validated by solving
again with ``2 * steps`` steps: for a fourth-order method the error of the finer solve is about
``|x_fine - x_coarse| / 15``, reported as ``error_estimate`` (RMS over samples and
dimensions). A reference is trustworthy when that estimate is far below the errors it is used
to measure; callers check this and say so. The grids are built here
(:func:`deis_jax.sampling.timesteps.time_grid`) and passed as ``ts``, so a reference is not
bound by the NFE cap of a sampler's budget (``MAX_NFE``): ``steps`` may be any size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from deis_jax.sampling.sampler import make_plan, sample
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.sampling.timesteps import time_grid
from deis_jax.sampling.wrappers import EpsFn, model_argument


class ReferenceSolve(NamedTuple):
    x0: np.ndarray
    error_estimate: float  # RMS, Richardson estimate for the returned (fine) solve
    steps: int
    nfe: int


def reference_solve(
    schedule: NoiseSchedule,
    eps_fn: EpsFn,
    x_T: jax.Array,
    *,
    t0: float,
    t1: float,
    steps: int = 500,
    grid: str = "log_snr",
) -> ReferenceSolve:
    """Solve from ``t1`` to ``t0`` with RK4 at ``steps`` and ``2 steps``; return the fine one.

    ``eps_fn`` is an argument of the compiled solve (:func:`model_argument`): the parameters of
    an ``eps_fn_from_model(Partial(apply, params), ...)`` are not baked into it. Runs under
    ``jax.default_matmul_precision("highest")``."""

    def solve(num_steps):
        ts = time_grid(schedule, num_steps, grid, t0=t0, t1=t1)
        plan = make_plan(schedule, ts, method="rhork", order=4)
        # full float32 matmuls (GPUs default to TF32 for them); the same numbers on a CPU
        with jax.default_matmul_precision("highest"):
            x0 = jax.jit(sample, static_argnums=0)(plan, model_argument(eps_fn), x_T)
        return np.asarray(x0, np.float64), plan.nfe

    coarse, _ = solve(steps)
    fine, nfe = solve(2 * steps)
    estimate = float(np.sqrt(np.mean((fine - coarse) ** 2)) / 15.0)
    return ReferenceSolve(fine, estimate, 2 * steps, nfe)
