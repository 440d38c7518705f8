"""Bad input to the sampling core: each case fails early with a message naming it (issue 13).

Schedules outside their valid interval, a network output of the wrong shape or dtype,
non-finite samples (found, and traced to their first step), and ill-typed, conflicting or
oversized sampler arguments.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deis_jax.sampling.diagnostics import (
    NonFiniteSamplesError,
    first_nonfinite_step,
    nonfinite_samples,
)
from deis_jax.sampling.sampler import get_sampler, make_plan, sample
from deis_jax.sampling.sde import VPSDE
from deis_jax.sampling.solvers import MethodArgumentError

VP = VPSDE.linear()
COSINE = VPSDE.cosine()
X = jax.random.normal(jax.random.PRNGKey(0), (4, 3), jnp.float32)


def half_x(x, t):
    return 0.5 * x


# --- 1. schedules refuse intervals outside their valid domain ------------------------------


def test_cosine_schedule_refuses_t1_of_one_and_runs_with_its_default():
    # alpha(1) ~ 6e-17 gave NaN or ~1e15 samples; now refused, naming the valid end.
    message = (r"t1 must be <= 0\.9979\d* \(the schedule's t_max\), got 1\.0: VPSDE\(cosine\)'s "
               r"valid interval is \[0, 0\.997998\]; beyond it beta\(t\) > 999")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        make_plan(COSINE, method="tab", nfe=10, t1=1.0)
    with pytest.raises(ValueError, match=r"time grid \(t1 = ts\[0\] = 1, .*\): t1 must be <="):
        make_plan(COSINE, np.array([1.0, 0.5, 1e-3]), method="ddim")
    out = get_sampler(COSINE, half_x, method="tab", nfe=10)(X)
    assert np.all(np.isfinite(np.asarray(out)))


# --- 2. the network's output is checked once, when the loop is traced -----------------------


@pytest.mark.parametrize(
    "eps_fn, message",
    [
        (lambda x, t: x[:, :1], r"eps_fn returned shape \(4, 1\) for an input of shape \(4, 3\)"),
        (lambda x, t: jnp.sum(x), r"eps_fn returned shape \(\) for an input of shape \(4, 3\)"),
        (lambda x, t: (x > 0).astype(jnp.int32), r"eps_fn returned dtype int32: it must return "
         r"a floating array"),
    ],
    ids=["broadcastable", "scalar", "integer"],
)  # fmt: skip
def test_network_output_of_the_wrong_shape_or_type_is_refused(eps_fn, message):
    for method in ("tab", "rhork"):  # the first stage and the later stages
        sampler = get_sampler(VP, eps_fn, method=method, order=2, nfe=4)
        with pytest.raises((ValueError, TypeError), match=message):
            jax.jit(sampler)(X)


@pytest.mark.parametrize("eps_dtype", [jnp.float16, jnp.bfloat16, jnp.float64])
def test_network_output_of_another_float_dtype_is_cast_to_the_state_dtype(eps_dtype):
    # The state's dtype is the working precision: a bf16/fp16 network widens exactly, a
    # float64 eps rounds as the state does.
    sampler = get_sampler(VP, lambda x, t: half_x(x, t).astype(eps_dtype), method="tab", nfe=4)
    plain = get_sampler(VP, lambda x, t: half_x(x, t).astype(eps_dtype).astype(jnp.float32),
                        method="tab", nfe=4)  # fmt: skip
    out = jax.jit(sampler)(X)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(plain)(X)))


def test_state_must_be_floating_with_a_batch_axis():
    sampler = get_sampler(VP, half_x, method="tab", nfe=4)
    with pytest.raises(TypeError, match=r"x_T must be a floating array .* dtype int32"):
        sampler(jnp.ones((4, 3), jnp.int32))


# --- 3. non-finite samples are found, and traced to their first step ------------------------


def test_nonfinite_samples_names_the_rows():
    x = np.zeros((8, 2, 3), np.float32)
    x[2, 1, 0], x[5, 0, 2] = np.nan, -np.inf
    for arr in (x, jnp.asarray(x)):
        np.testing.assert_array_equal(nonfinite_samples(arr), [2, 5])
    assert nonfinite_samples(np.ones((3, 2))).size == 0
    with pytest.raises(ValueError, match="leading batch axis"):
        nonfinite_samples(np.float32(1.0))


def nan_below(t_bad):
    """eps = 0 (DDIM then only rescales x, keeping its signs), NaN at t < t_bad for the rows
    whose first coordinate is negative."""

    def eps_fn(x, t):
        bad = (x[:, :1] < 0) & (t < t_bad)
        return jnp.where(bad, jnp.nan, 0.0) * jnp.ones_like(x)

    return eps_fn


def test_first_nonfinite_step_per_sample():
    ts = np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.1])
    x_T = jnp.asarray([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0], [-0.5, 3.0]])
    plan = make_plan(VP, ts, method="ddim")
    out = sample(plan, nan_below(0.5), x_T)
    np.testing.assert_array_equal(nonfinite_samples(out), [1, 3])
    # eps is evaluated at ts[k] by step k: t = 0.4 is step 3
    np.testing.assert_array_equal(first_nonfinite_step(plan, nan_below(0.5), x_T), [-1, 3, -1, 3])
    denoised = make_plan(VP, ts, method="ddim", final_denoise=True)  # its step is number 5
    steps = first_nonfinite_step(denoised, nan_below(0.15), x_T)
    np.testing.assert_array_equal(steps, [-1, 5, -1, 5])
    with pytest.raises(ValueError, match=r"x_T is not finite in rows \[2\]"):
        first_nonfinite_step(plan, nan_below(0.5), x_T.at[2, 1].set(jnp.inf))


def test_recording_does_not_change_the_samples():
    plan = make_plan(VP, method="tab", nfe=5, final_denoise=True)  # + 1 step
    x, flags = sample(plan, half_x, X, record=lambda s: jnp.all(s == s, axis=1))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(sample(plan, half_x, X)))
    assert flags.shape == (plan.num_steps + 1, X.shape[0]) and bool(jnp.all(flags))


def test_nonfinite_samples_error_message():
    err = NonFiniteSamplesError([3, 7], first_step=[2, 4])
    assert str(err).startswith(
        "2 samples came back non-finite (NaN or Inf): rows [3, 7]; first non-finite step [2, 4]."
    )
    many = NonFiniteSamplesError(np.arange(12))
    assert "12 samples came back" in str(many) and "9, ... (12 in all)]" in str(many)
    assert many.first_step is None and list(many.indices[:2]) == [0, 1]
    with pytest.raises(ValueError, match="first_step must align with indices"):
        NonFiniteSamplesError([1, 2], first_step=[0])


# --- 4. sampler arguments: quick at any size, typed, not conflicting ------------------------


def test_huge_nfe_is_refused_at_once():
    start = time.perf_counter()
    message = r"nfe must be <= 10000, got 1000000 \(method 'tab'\).*explicit grid ts"
    with pytest.raises(MethodArgumentError, match=message):
        make_plan(VP, method="tab", nfe=1_000_000)
    assert time.perf_counter() - start < 0.5
    assert make_plan(VP, method="ddim", nfe=10_000).nfe == 10_000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nfe": 5}, r"nfe conflicts with the explicit grid ts .*\(got ts and nfe\)"),
        ({"t0": 1e-3, "grid": "log_snr"}, r"grid conflicts with the explicit grid ts .*\(got ts "
         r"and grid, t0\)"),
    ],
)  # fmt: skip
def test_explicit_grid_with_grid_arguments_is_refused(kwargs, message):
    with pytest.raises(MethodArgumentError, match=message):
        make_plan(VP, np.array([1.0, 0.5, 1e-3]), method="tab", **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"order": 2.5}, r"order must be one of \(0, 1, 2, 3\) for method 'tab', got 2\.5 "
         r"\(a float\)"),
        ({"order": True}, r"order must be one of .* got True \(a bool\)"),
        ({"order": "2"}, r"order must be one of .* got '2' \(a str\)"),
        ({"nfe": True}, r"nfe must be an integer >= 1, got True"),
        ({"nfe": float("inf")}, r"nfe must be an integer >= 1, got inf"),
        ({"final_denoise": "yes"}, r"final_denoise must be True or False, got 'yes'"),
    ],
)  # fmt: skip
def test_ill_typed_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(MethodArgumentError, match=message):
        make_plan(VP, **{"method": "tab", "nfe": 6, **kwargs})


def test_integral_orders_and_budgets_of_any_type_are_accepted():
    # 2.0 and numpy integers are integers (a config or a sweep may hold them); True is not.
    base = make_plan(VP, method="tab", order=2, nfe=6)
    for order, nfe in [(2.0, 6.0), (np.int64(2), np.int32(6))]:
        plan = make_plan(VP, method="tab", order=order, nfe=nfe)
        assert type(plan.order) is int and plan.order == 2 and plan.nfe == 6
        np.testing.assert_array_equal(plan.table.out_k, base.table.out_k)
