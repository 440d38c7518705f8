"""Test-session setup, and the rule every numeric assertion follows.

The rule (also the README's "Testing" paragraph):

* Bit-equality (``assert_array_equal``, ``==`` on floats) only where bit-identity is the
  behaviour claimed -- a resumed fit or run, sharded vs unsharded, batch invariance, a
  neutral parameter reproducing its base table bit for bit, a cache or file round trip, a
  copy, a layout change or a value set exactly by construction -- AND both sides run the same
  compiled code on the same machine: the same jitted function with the same shapes and the
  same constants, or the same host numpy code. A jitted function and an eager call, two
  different jitted programs around the same ops, or one program at two batch shapes are not
  the same compiled code.
* Everything else -- host numpy vs XLA, another compiled program, a parametrisation round
  trip, a fixture or golden value written on another machine or by another library -- gets a
  tolerance derived from the precision and the depth of the computation, named in
  ``tolerances.py`` or given with a one-line reason where it is set: float32 through a
  20-block U-Net is ``f32_net_rtol(20)`` (~3.4e-5), not 1e-5; a float64 round trip is a few
  ulp (``assert_close_ulp``), not zero.
* Tests whose results depend on low-order bits (fixtures against the original code, golden
  values, fits, convergence orders) carry the ``numerics`` marker; the README's test command
  runs them a second time under another floating-point configuration (XLA's optimising
  pipeline, no AVX2/FMA code, numpy's baseline SIMD kernels), which changes the low-order
  bits of those computations (scripts/numerics_probe.py shows by how much).

Session setup:

* float64 everywhere: x64 is process-global in JAX, and several test modules need it for
  precision; enabling it here makes the session independent of the order in which modules are
  imported. Tests that check float32 behaviour pass explicit dtypes.
* Most XLA optimisations off (``jax_disable_most_optimizations``): the suite is dominated by
  compile time, not run time, and it checks results, not speed (speed is the benchmark
  scripts' job). This cut the sequential suite from about 15.7 to 12.6 minutes on the 2-core
  CI machine with the same results (the README command also runs it on two processes, about
  9.7 minutes); the multi-device workers of ``test_parallel.py`` run in
  subprocesses with the default (optimised) compilation, so the bit-identity claims are
  checked on optimised code. ``JAX_DISABLE_MOST_OPTIMIZATIONS=0`` in the environment keeps
  the optimising pipeline (the second, ``numerics`` pass does).
"""

import os

import jax
import pytest

jax.config.update("jax_enable_x64", True)
if "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ:
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def keep_x64():
    value = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", value)


@pytest.fixture
def nan_eps_above(monkeypatch):
    """``set(t_nan)``: every mixture's eps is NaN at times ``t > t_nan``, and the reference
    solve is replaced by a finite stand-in (only the samplers' cells may fail). Used by the
    failed-cell tests of compare (test_main_compare.py) and sweep (test_sweep.py)."""
    import jax.numpy as jnp
    import numpy as np

    from deis_jax.evaluation.analytic import GaussianMixture
    from deis_jax.evaluation.reference import ReferenceSolve
    from deis_jax.experiments import gmm

    exact = GaussianMixture.eps_fn

    def set_threshold(t_nan: float) -> None:
        def eps_fn(self, schedule):
            f = exact(self, schedule)

            def nan_above(x, t):
                t = jnp.reshape(jnp.asarray(t), (-1,) + (1,) * (x.ndim - 1))
                return jnp.where(t > t_nan, jnp.nan, f(x, t))

            return nan_above

        monkeypatch.setattr(GaussianMixture, "eps_fn", eps_fn)

    def finite_reference(schedule, eps_fn, x_T, *, t0, t1, steps):
        return ReferenceSolve(np.zeros(x_T.shape), 0.0, 2 * steps, 8 * steps)

    monkeypatch.setattr(gmm, "reference_solve", finite_reference)
    return set_threshold
