"""Reference solves (``evaluation.reference.reference_solve``): the RK4 plan of their budget
below the NFE cap, and solves past it."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.evaluation.reference import reference_solve
from deis_jax.experiments import gmm
from deis_jax.sampling.sampler import make_plan, sample
from deis_jax.sampling.sde import VPSDE
from deis_jax.sampling.solvers.registry import MAX_NFE
from deis_jax.sampling.timesteps import time_grid
from deis_jax.sampling.wrappers import model_argument

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import gmm_vpsde  # noqa: E402

SDE = VPSDE()


def _tiny_problem():
    eps_fn = gmm.mixture_for_dim(gmm_vpsde.get_config(), 2).eps_fn(SDE)
    x_T = SDE.prior_sample(jax.random.PRNGKey(0), (4, 2), jnp.float32)
    return eps_fn, x_T


def test_reference_solve_is_the_rk4_plan_of_its_budget():
    """Below the cap the explicit grid gives exactly the plan the NFE budget gave."""
    eps_fn, x_T = _tiny_problem()
    ref = reference_solve(SDE, eps_fn, x_T, t0=1e-3, t1=1.0, steps=10)
    plan = make_plan(SDE, method="rhork", order=4, nfe=80, grid="log_snr", t0=1e-3, t1=1.0)
    assert (ref.steps, ref.nfe) == (20, 80)
    # the same grid (one host computation) and, through the compiled solve reference_solve
    # runs, the same samples bit for bit (an eager ``sample`` is another program)
    np.testing.assert_array_equal(time_grid(SDE, 20, "log_snr", t0=1e-3, t1=1.0), plan.ts)
    solve = jax.jit(sample, static_argnums=0)(plan, model_argument(eps_fn), x_T)
    np.testing.assert_array_equal(ref.x0, np.asarray(solve, np.float64))


def test_reference_solve_beyond_max_nfe():
    eps_fn, x_T = _tiny_problem()
    ref = reference_solve(SDE, eps_fn, x_T, t0=1e-3, t1=1.0, steps=2000)
    assert ref.nfe == 16000 > MAX_NFE and ref.steps == 4000
    assert np.all(np.isfinite(ref.x0)) and ref.error_estimate < 1e-5


# --- 4. NFE lists checked at start-up ------------------------------------------------------
