"""Learned step tables (``deis_jax.sampling.learned``): bounded sum-zero corrections of a
method's output coefficients. Zero corrections are the base method bit for bit; any correction
keeps each row's total coefficient, so constant model outputs are integrated as by the base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close_max_rel, solve_rtol

import deis_jax as deis
from deis_jax.sampling.learned import corrected_table, correction_deltas, correction_mask
from deis_jax.sampling.sampler import make_plan, sample
from deis_jax.sampling.wrappers import model_argument

SDE = deis.VPSDE.linear()
PLANS = {
    "tab3": dict(method="tab", order=3, nfe=6),
    "dpmpp3": dict(method="dpmpp", order=3, nfe=6),
    "rk4": dict(method="rhork", order=4, nfe=8),
    "ddim": dict(method="ddim", nfe=4),
}
run = jax.jit(sample, static_argnums=0)


@pytest.fixture(scope="module", params=sorted(PLANS))
def plan(request):
    return make_plan(SDE, **PLANS[request.param])


def random_raw(table, seed=0, scale=2.0):
    return scale * np.random.default_rng(seed).normal(size=correction_mask(table).shape)


def coefs(table):
    return np.concatenate([np.asarray(table.out_k), np.asarray(table.out_hist)], axis=1)


def test_mask_marks_stage_outputs_and_existing_history():
    table = make_plan(SDE, method="tab", order=3, nfe=5).table  # N=5, S=1, H=3
    expected = np.array(
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 1, 1, 1],
            [1, 1, 1, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(correction_mask(table), expected)
    rk = make_plan(SDE, method="rhork", order=4, nfe=8).table  # N=2, S=4, H=0
    np.testing.assert_array_equal(correction_mask(rk), np.ones((2, 4), dtype=bool))


def test_zero_corrections_give_the_base_table_exactly(plan):
    zeros = np.zeros(correction_mask(plan.table).shape)
    for raw in (zeros, -zeros):
        table = corrected_table(plan.table, raw, 0.3)
        for got, want in zip(table, plan.table, strict=True):
            np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.numerics
def test_zero_corrections_give_the_base_samples_exactly():
    plan = make_plan(SDE, **PLANS["tab3"])
    f = model_argument(deis.GaussianMixture.ring().eps_fn(SDE))
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
    table = corrected_table(plan.table, np.zeros(correction_mask(plan.table).shape), 0.1)
    out = run(plan, f, x, table=table)
    # the same compiled program (the table an argument) on the base table: bit for bit
    np.testing.assert_array_equal(out, run(plan, f, x, table=plan.table))
    # the plan's own run bakes its table in as constants: another program, float64 rounding
    assert_close_max_rel(out, run(plan, f, x), solve_rtol(np.float64, plan.nfe))


def test_corrections_keep_row_sums_and_are_bounded(plan):
    base, mask = plan.table, correction_mask(plan.table)
    max_delta = 0.2
    raw = random_raw(base)
    table = corrected_table(base, raw, max_delta)
    delta = coefs(table) - coefs(base)
    scale = np.abs(np.sum(coefs(base) * mask, axis=1))
    np.testing.assert_allclose(np.sum(delta, axis=1), 0.0, atol=1e-14 * scale.max())
    # inactive slots (history that does not exist yet) are never touched, bit for bit
    np.testing.assert_array_equal(coefs(table)[~mask], coefs(base)[~mask])
    # before centring |d| <= max_delta * scale; centring at most doubles it (2 (1 - 1/n))
    d = max_delta * scale[:, None] * np.tanh(raw) * mask
    assert np.all(np.abs(d) <= max_delta * scale[:, None])
    n = mask.sum(axis=1)
    bound = 2.0 * (1.0 - 1.0 / n) * max_delta * scale
    assert np.all(np.abs(delta) <= bound[:, None] * (1 + 1e-12))
    # rows with a single active slot (DDIM, the first multistep row) cannot change
    np.testing.assert_array_equal(coefs(table)[n == 1], coefs(base)[n == 1])
    # every other field is the base table's
    for name in ("t", "stage_x", "stage_k", "pred_x", "pred_eps", "out_x", "out_noise"):
        np.testing.assert_array_equal(getattr(table, name), getattr(base, name))
    if base.num_stages + base.history > 1:
        assert np.max(np.abs(delta)) > 1e-3 * scale.max()  # it did change something


@pytest.mark.numerics
def test_deltas_match_the_documented_formula():
    base = make_plan(SDE, **PLANS["tab3"]).table
    mask = correction_mask(base)
    raw = random_raw(base, seed=3)
    scale = np.abs(np.sum(coefs(base) * mask, axis=1, keepdims=True))
    d = 0.1 * scale * np.tanh(raw) * mask
    want = (d - d.sum(axis=1, keepdims=True) / mask.sum(axis=1, keepdims=True)) * mask
    np.testing.assert_allclose(correction_deltas(base, raw, 0.1), want, rtol=1e-14, atol=1e-16)


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["tab3", "dpmpp3", "rk4"])
def test_constant_model_output_is_integrated_as_by_the_base(name):
    """A sum-zero correction leaves a constant K (eps, or the x0 prediction for data-prediction
    methods) integrated exactly like the base method."""
    plan = make_plan(SDE, **PLANS[name])
    c = jnp.array([0.7, -1.3])
    if plan.structure.converts:  # the stages combine x0 predictions: make x0(x, t) = c

        def model(x, t):
            return (x - SDE.alpha(t) * c) / SDE.sigma(t)

    else:

        def model(x, t):
            return jnp.broadcast_to(c, x.shape)

    f = model_argument(model)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
    table = corrected_table(plan.table, random_raw(plan.table, seed=1), 0.5)
    assert not np.allclose(coefs(table), coefs(plan.table))
    out, want = run(plan, f, x, table=table), run(plan, f, x)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.numerics
def test_traced_and_numpy_corrected_tables_agree():
    plan = make_plan(SDE, method="ipndm", order=3, nfe=6)
    raw = random_raw(plan.table, seed=2)

    @jax.jit
    def traced(ts, raw):
        base = plan.build_table(ts)
        return base, corrected_table(base, raw, 0.1), corrected_table(base, 0.0 * raw, 0.1)

    base, got, unchanged = traced(jnp.asarray(plan.ts), jnp.asarray(raw))
    want = corrected_table(plan.table, raw, 0.1)
    for a, b in zip(got, want, strict=True):
        assert isinstance(b, np.ndarray) and b.dtype == np.float64
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-14)
    for a, b in zip(unchanged, base, strict=True):  # raw = 0 under jit: bit for bit
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wrong_shape_is_refused():
    table = make_plan(SDE, **PLANS["tab3"]).table
    with pytest.raises(ValueError, match="shape"):
        corrected_table(table, np.zeros((table.num_steps, 2)), 0.1)
