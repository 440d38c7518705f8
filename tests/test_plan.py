"""The model-agnostic core: plans, ``sample(plan, eps_fn, x_T)``, traced tables, the loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as deis
from deis_jax.sampling.sampler import make_plan, sample, table_structure
from deis_jax.sampling.wrappers import eps_fn_from_model, model_argument

SDE = deis.VPSDE.linear()
MIXTURE = deis.GaussianMixture.ring()
EPS = MIXTURE.eps_fn(SDE)
X_T = jax.random.normal(jax.random.PRNGKey(0), (16, 2), jnp.float64)


@pytest.mark.parametrize(
    "method,order,options",
    [("ddim", 0, {}), ("tab", 3, {}), ("ipndm", 3, {}), ("rhork", 2, {}), ("dpmpp", 3, {}),
     ("unipc", 2, {}), ("ersde", 3, {})],
)  # fmt: skip
def test_sample_of_plan_equals_get_sampler(method, order, options):
    plan = make_plan(SDE, method=method, order=order, nfe=8, **options)
    sampler = deis.get_sampler(SDE, EPS, method=method, order=order, nfe=8, **options)
    key = jax.random.PRNGKey(3) if plan.stochastic else None
    a = jax.jit(sample, static_argnums=0)(plan, model_argument(EPS), X_T, key)
    b = jax.jit(sampler)(X_T, key)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sampler.nfe == plan.nfe and np.array_equal(sampler.ts, plan.ts)


def test_parameters_are_arguments_not_constants():
    """With a Partial-bound network the parameters are leaves of the compiled function's
    arguments; changing them changes the output without recompiling."""

    def apply(params, x, cond):
        return jnp.tanh(x @ params["w"]) * params["b"] + 0.0 * cond[:, None]

    params = {"w": jnp.eye(2) * 0.5, "b": jnp.ones(2)}
    eps_fn = eps_fn_from_model(jax.tree_util.Partial(apply, params), SDE)
    plan = make_plan(SDE, method="tab", order=3, nfe=6)
    run = jax.jit(lambda plan, f, x: sample(plan, f, x), static_argnums=0)
    lowered = run.lower(plan, eps_fn, X_T)
    assert lowered.in_tree.num_leaves == 2 + 1  # w, b and x_T
    out1 = run(plan, eps_fn, X_T)
    params2 = {"w": jnp.eye(2) * 0.25, "b": jnp.ones(2)}
    out2 = run(plan, eps_fn_from_model(jax.tree_util.Partial(apply, params2), SDE), X_T)
    assert run._cache_size() == 1
    assert not np.allclose(out1, out2)


@pytest.mark.numerics
def test_traced_table_runs_the_same_loop():
    plan = make_plan(SDE, method="tab", order=2, nfe=6)
    traced = jax.jit(
        lambda ts, x: sample(plan, EPS, x, table=plan.build_table(ts))
    )(jnp.asarray(plan.ts), X_T)  # fmt: skip
    np.testing.assert_allclose(np.asarray(traced), np.asarray(sample(plan, EPS, X_T)), rtol=1e-13)


@pytest.mark.numerics
def test_trajectory_holds_every_grid_state():
    plan = make_plan(SDE, method="dpmpp", order=2, nfe=5)
    x0, states = sample(plan, EPS, X_T, trajectory=True)
    assert states.shape == (plan.num_steps + 1, *X_T.shape)
    np.testing.assert_array_equal(np.asarray(states[0]), np.asarray(X_T))
    np.testing.assert_array_equal(np.asarray(states[-1]), np.asarray(x0))
    # restarting from an intermediate state on the rest of the grid is not the same method
    # (the history is lost), but the first step alone is: one step of the 1-step plan
    first = make_plan(SDE, plan.ts[:2], method="dpmpp", order=2)
    np.testing.assert_allclose(np.asarray(sample(first, EPS, X_T)), np.asarray(states[1]),
                               rtol=1e-13)  # fmt: skip


def test_structure_is_static_and_read_off_the_host_table():
    assert table_structure(make_plan(SDE, method="dpmpp", nfe=4).table).converts
    assert not table_structure(make_plan(SDE, method="tab", nfe=4).table).converts
    assert table_structure(make_plan(SDE, method="ersde", nfe=4).table).noisy


def test_multistep_loop_copies_no_history_buffer():
    """The compiled tAB-3 loop writes the history ring in place: no copy of a buffer of the
    ring's shape anywhere in the program (a copy per step cost 2-3x with a cheap eps)."""
    x = jnp.zeros((8, 64))
    eps_fn = deis.GaussianMixture.embedded(64).eps_fn(SDE)
    sampler = deis.get_sampler(SDE, eps_fn, method="tab", order=3, nfe=10)
    text = jax.jit(sampler).lower(x).compile().as_text()
    ring = sampler.table.history + 1
    copies = re.findall(rf"= f64\[{ring},8,64\]\S* copy\(", text)
    assert not copies, copies
