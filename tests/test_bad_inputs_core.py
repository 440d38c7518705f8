"""Bad input to the sampling core: each case fails early with a message naming it (issues 13
and 19).

Schedules outside their valid interval (or not a schedule), malformed grids, a network output
of the wrong shape, dtype or type, non-finite samples (found, and traced to their first step,
also on request inside ``sample``), ill-typed, conflicting or oversized sampler arguments, and
learned rule parameters given to a plan they were not trained for.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close_max_rel, solve_rtol

from deis_jax.fitting.amed import init_params
from deis_jax.sampling.diagnostics import NonFiniteSamplesError, nonfinite_samples
from deis_jax.sampling.rule_params import RuleParams
from deis_jax.sampling.sampler import first_nonfinite_step, get_sampler, make_plan, sample
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
    # two compiled programs (the cast inside the loop or inside eps): float32 solve rounding
    assert_close_max_rel(out, jax.jit(plain)(X), solve_rtol(jnp.float32, 4))


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
    # the recording loop is another compiled program (an extra output): float32 solve rounding
    assert_close_max_rel(x, sample(plan, half_x, X), solve_rtol(jnp.float32, plan.nfe))
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


# --- 5. the last bad inputs of the hostile battery (issue 19) --------------------------------


@pytest.mark.parametrize(
    "ts, message",
    [
        ([], r"ts must be a 1-D array of at least 2 times .* got shape \(0,\)"),
        ([0.5], r"ts must be a 1-D array of at least 2 times .* got shape \(1,\)"),
        ([[1.0, 0.5, 1e-3]], r"ts must be a 1-D array .* got shape \(1, 3\)"),
        ([1.0, "a"], r"ts must be a 1-D array of times, got \[1\.0, 'a'\]"),
    ],
    ids=["empty", "one-point", "2-D", "not-numbers"],
)
def test_malformed_explicit_grids_are_refused_by_name(ts, message):
    with pytest.raises(ValueError, match=message):
        make_plan(VP, ts, method="tab")


def test_a_schedule_given_by_name_is_refused_by_name():
    message = r"schedule must be a NoiseSchedule such as VPSDE\.linear\(\) or get_sde\('vpsde'\)"
    with pytest.raises(TypeError, match=message + r", got str 'vpsde'"):
        make_plan("vpsde", method="tab", nfe=5)
    with pytest.raises(TypeError, match=message):
        get_sampler("vpsde", half_x, method="tab", nfe=5)


@pytest.mark.parametrize("method", ["tab", "rhork"])  # the first stage and the later ones
def test_an_eps_fn_returning_a_tuple_is_refused_by_name(method):
    sampler = get_sampler(VP, lambda x, t: (half_x(x, t), x), method=method, order=2, nfe=4)
    message = r"eps_fn returned a tuple of 2 items: it must return one array of the input's shape"
    with pytest.raises(TypeError, match=message):
        jax.jit(sampler)(X)


def test_check_finite_names_the_samples_and_their_first_step():
    ts = np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.1])
    plan = make_plan(VP, ts, method="ddim")
    x_T = jnp.asarray([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0], [-0.5, 3.0]])
    eps_fn = nan_below(0.5)
    assert not np.all(np.isfinite(np.asarray(sample(plan, eps_fn, x_T))))  # silent by default
    message = r"2 samples came back non-finite \(NaN or Inf\): rows \[1, 3\]; first non-finite "
    with pytest.raises(NonFiniteSamplesError, match=message + r"step \[3, 3\]") as info:
        sample(plan, eps_fn, x_T, check_finite=True)
    np.testing.assert_array_equal(info.value.first_step, [3, 3])
    finite = sample(plan, half_x, x_T, check_finite=True)  # a finite run returns as usual
    # check_finite runs the very same sample call first (same program, same inputs): bit for bit
    np.testing.assert_array_equal(np.asarray(finite), np.asarray(sample(plan, half_x, x_T)))
    with pytest.raises(ValueError, match=r"x_T is not finite \(NaN or Inf\) in rows \[2\]"):
        sample(plan, half_x, x_T.at[2, 1].set(jnp.nan), check_finite=True)
    with pytest.raises(TypeError, match=r"check_finite=True\) needs concrete arrays"):
        jax.jit(lambda x: sample(plan, half_x, x, check_finite=True))(x_T)


def test_check_finite_reruns_with_the_same_noise():
    """A stochastic sampler's failing rows are rediagnosed with their own global indices."""
    plan = make_plan(VP, method="sddim", nfe=6)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (6, 3))

    def eps_fn(x, t):  # NaN once t < 0.3 for the rows with a large first coordinate
        return jnp.where((x[:, :1] > 0.5) & (t < 0.3), jnp.nan, 0.0) * jnp.ones_like(x)

    out = np.asarray(sample(plan, eps_fn, x_T, jax.random.PRNGKey(1), index_offset=10))
    bad = nonfinite_samples(out)
    assert 0 < bad.size < 6
    with pytest.raises(NonFiniteSamplesError) as info:
        sample(plan, eps_fn, x_T, jax.random.PRNGKey(1), index_offset=10, check_finite=True)
    np.testing.assert_array_equal(info.value.indices, bad)
    assert np.all(info.value.first_step >= 0)


def amed_rule_params(plan):
    return RuleParams.for_plan(plan, init_params(plan, half_x, X))


def test_rule_params_trained_for_another_plan_are_refused_by_name():
    solver5 = make_plan(VP, method="amed", nfe=5, afs=True, predictor="stepwise")
    params = amed_rule_params(solver5)
    sample(solver5, half_x, X, rule_params=params)  # its own plan
    cases = [
        (make_plan(VP, method="amed", nfe=7, afs=True, predictor="stepwise"),
         r"nfe: trained for 5, asked for 7"),
        (make_plan(VP, method="amed_ddim", nfe=5, afs=True, predictor="stepwise"),
         r"method: trained for 'amed', asked for 'amed_ddim'"),
        (make_plan(VP, method="amed", nfe=6, predictor="stepwise"),
         r"afs: trained for True, asked for False"),
        (make_plan(VP, method="amed", nfe=5, afs=True, predictor="stepwise", scale_time=0.1),
         r"options: trained for .*'scale_time': 0\.0"),
        (make_plan(COSINE, method="amed", nfe=5, afs=True, predictor="stepwise"),
         r"schedule: trained for"),
        (make_plan(VP, method="amed", nfe=5, afs=True, predictor="stepwise", grid="log_snr"),
         r"ts: trained for"),
    ]  # fmt: skip
    for plan, message in cases:
        with pytest.raises(ValueError, match=r"rule_params were trained for another plan: .*"
                           + message):  # fmt: skip
            sample(plan, half_x, X, rule_params=params)
    plugin5 = make_plan(VP, method="amed_ipndm", nfe=5, afs=True, predictor="stepwise")
    with pytest.raises(ValueError, match=r"method: trained for 'amed_ipndm', asked for 'amed'"):
        jax.jit(lambda x, p: sample(solver5, half_x, x, rule_params=p))(
            X, amed_rule_params(plugin5)
        )


def test_bare_rule_parameters_are_refused_with_the_way_to_declare_them():
    plan = make_plan(VP, method="amed", nfe=5, afs=True, predictor="stepwise")
    bare = init_params(plan, half_x, X)
    with pytest.raises(
        TypeError,
        match=r"rule_params must be a RuleParams .*got a bare dict; "
        r"for parameters made by hand use RuleParams\.for_plan\(plan, params\)",
    ):
        sample(plan, half_x, X, rule_params=bare)  # fmt: skip
    declared = RuleParams.for_plan(plan, bare)
    assert repr(declared) == "RuleParams(amed, order=2, nfe=5, afs=True)"
    leaves = jax.tree.leaves(declared)  # a pytree whose leaves are the parameters
    assert len(leaves) == len(jax.tree.leaves(bare))
