"""AMED predictor networks: sizes, ranges, DPM-Solver-2 start, shared time weights, settings."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deis_jax.sampling.amed_predictor import (
    AmedPredictor,
    StepwisePredictor,
    bounded_scale,
    init_predictor,
    predictor_from_settings,
    predictor_settings,
    sinusoidal_embedding,
)

F = 64
B = 5


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _features(key=1, batch=B, width=F):
    return jax.random.normal(jax.random.PRNGKey(key), (batch, width), jnp.float32)


@pytest.mark.parametrize(
    ("scale_dir", "scale_time", "expected"),
    [(0.0, 0.0, 8929), (0.3, 0.0, 8950), (0.0, 0.2, 8950), (0.3, 0.2, 8971)],
)
def test_parameter_counts(scale_dir, scale_time, expected):
    module = AmedPredictor(scale_dir=scale_dir, scale_time=scale_time)
    params = init_predictor(module, jax.random.PRNGKey(0), F)
    assert _count(params) == expected
    assert ("c_head" in params) == (scale_dir > 0)
    assert ("a_head" in params) == (scale_time > 0)


def test_time_embedding_is_shared_and_initialised_as_specified():
    params = init_predictor(AmedPredictor(0.1, 0.1), jax.random.PRNGKey(0), F)
    assert set(params) == {"time_embed", "feat_hidden", "feat_out", "r_head", "c_head", "a_head"}
    kernels = [k for k in jax.tree.leaves(params) if k.shape == (8, 8)]
    assert len(kernels) == 1
    assert params["time_embed"]["kernel"].shape == (8, 8)
    # Xavier-uniform: |w| <= sqrt(6 / (8 + 8)); every bias is zero.
    assert float(jnp.max(jnp.abs(params["time_embed"]["kernel"]))) <= math.sqrt(6 / 16)
    for layer in params.values():
        np.testing.assert_array_equal(layer["bias"], 0.0)
    # N(0, 1/fan_in): the 64x128 kernel has std close to 1/8.
    std = float(jnp.std(params["feat_hidden"]["kernel"]))
    assert abs(std - 1 / 8) < 0.01


def test_sinusoidal_embedding_layout():
    emb = sinusoidal_embedding(jnp.array([0.0, 2.0]), 8)
    assert emb.shape == (2, 8)
    freqs = 10000.0 ** (-np.arange(4) / 3)
    np.testing.assert_allclose(freqs, [1, 0.0464159, 2.15443e-3, 1e-4], rtol=1e-5)
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(
        emb[1], np.concatenate([np.cos(2 * freqs), np.sin(2 * freqs)]), rtol=1e-6
    )


def test_outputs_shapes_and_ranges_with_large_weights():
    dc, da = 0.3, 0.2
    module = AmedPredictor(scale_dir=dc, scale_time=da)
    params = init_predictor(module, jax.random.PRNGKey(0), F)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(3)
    features = 3.0 * _features()
    noise = [jnp.asarray(rng.standard_normal(x.shape), x.dtype) for x in leaves]
    # (a) init weights x 1.5 plus noise (logits up to ~13): r strictly inside (0, 1);
    # (b) N(0, 50^2) weights: saturated heads, r may round to 0 or 1 but the ranges still hold.
    for big_leaves, open_r in [
        ([1.5 * x + 0.1 * n for x, n in zip(leaves, noise, strict=True)], True),
        ([50.0 * n for n in noise], False),
    ]:
        big = jax.tree.unflatten(tree, big_leaves)
        r, c, a = module.apply({"params": big}, features, 80.0, 6.95, 0)
        for out in (r, c, a):
            assert out.shape == (B,)
            assert out.dtype == jnp.float32
        if open_r:
            assert bool(jnp.all((r > 0) & (r < 1)))
            assert float(jnp.std(r)) > 0  # per-sample values
        else:
            assert bool(jnp.all((r >= 0) & (r <= 1)))
        tol = 1e-6
        assert bool(jnp.all((c >= 1 - dc - tol) & (c <= 1 + dc + tol)))
        assert bool(jnp.all((a >= 1 - da - tol) & (a <= 1 + da + tol)))
    # Large weights actually reach the ends of the ranges.
    assert float(jnp.max(jnp.abs(c - 1))) > 0.9 * dc


def test_disabled_heads_give_exact_ones():
    module = AmedPredictor()
    params = init_predictor(module, jax.random.PRNGKey(0), F)
    r, c, a = module.apply({"params": params}, _features(), 1.0, 0.5, 2)
    np.testing.assert_array_equal(c, 1.0)
    np.testing.assert_array_equal(a, 1.0)
    # Near the DPM-Solver-2 start even with random init.
    assert bool(jnp.all((r > 0.05) & (r < 0.95)))


@pytest.mark.parametrize(("dc", "da"), [(0.0, 0.0), (0.1, 0.0), (0.37, 0.9)])
def test_zero_weights_give_dpm_solver_2(dc, da):
    module = AmedPredictor(scale_dir=dc, scale_time=da)
    params = jax.tree.map(jnp.zeros_like, init_predictor(module, jax.random.PRNGKey(0), F))
    r, c, a = module.apply({"params": params}, _features(), 14.6, 3.2, 0)
    np.testing.assert_array_equal(r, 0.5)
    np.testing.assert_array_equal(c, 1.0)
    np.testing.assert_array_equal(a, 1.0)


def test_accepts_unflattened_and_zero_features_and_batched_rho():
    module = AmedPredictor(scale_dir=0.1)
    params = init_predictor(module, jax.random.PRNGKey(0), F)
    feats = _features().reshape(B, 8, 8)
    out_2d = module.apply({"params": params}, feats.reshape(B, F), 2.0, 1.0, 0)
    out_3d = module.apply({"params": params}, feats, 2.0, 1.0, 0)
    for x, y in zip(out_2d, out_3d, strict=True):
        np.testing.assert_array_equal(x, y)
    # AFS step: all-zero features -> the same output for every sample.
    r, _, _ = module.apply({"params": params}, jnp.zeros((B, F)), 80.0, 40.0, 0)
    np.testing.assert_allclose(r, r[0])
    rho = jnp.full((B,), 2.0)
    r_vec, _, _ = module.apply({"params": params}, feats, rho, 1.0, 0)
    np.testing.assert_allclose(r_vec, out_2d[0], rtol=1e-6)


def test_jit_and_gradients_are_finite_and_nonzero():
    module = AmedPredictor(scale_dir=0.2, scale_time=0.2)
    params = init_predictor(module, jax.random.PRNGKey(0), F)
    features = _features()

    @jax.jit
    def loss(p, rho_cur, rho_next):
        r, c, a = module.apply({"params": p}, features, rho_cur, rho_next, 1)
        return jnp.sum((r - 0.3) ** 2 + (c - 1.1) ** 2 + (a - 0.9) ** 2)

    grads = jax.grad(loss)(params, 6.95, 1.29)
    for g in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g)))
    for name in ("r_head", "c_head", "a_head", "time_embed", "feat_hidden"):
        assert float(jnp.max(jnp.abs(grads[name]["kernel"]))) > 0, name
    assert float(jnp.max(jnp.abs(grads["r_head"]["bias"]))) > 0


def test_bounded_scale():
    x = jnp.linspace(-30.0, 30.0, 101)
    np.testing.assert_allclose(bounded_scale(x, 0.4), 0.6 + 0.8 * jax.nn.sigmoid(x), atol=1e-6)
    np.testing.assert_array_equal(bounded_scale(jnp.zeros(3), 0.123), 1.0)
    np.testing.assert_array_equal(bounded_scale(x, 0.0), 1.0)


def test_stepwise_predictor_init_and_traced_step():
    module = StepwisePredictor(num_steps=4, scale_dir=0.2, scale_time=0.1)
    params = init_predictor(module, jax.random.PRNGKey(0))
    assert {k: v.shape for k, v in params.items()} == {
        "r_logit": (4,),
        "c_logit": (4,),
        "a_logit": (4,),
    }
    features = jnp.zeros((B, 3))
    for step in range(4):
        r, c, a = module.apply({"params": params}, features, 1.0, 0.5, step)
        assert r.shape == c.shape == a.shape == (B,)
        np.testing.assert_array_equal(r, 0.5)
        np.testing.assert_array_equal(c, 1.0)
        np.testing.assert_array_equal(a, 1.0)

    trained = {
        "r_logit": jnp.array([-1.0, 0.0, 1.0, 2.0]),
        "c_logit": jnp.array([5.0, -5.0, 0.0, 1.0]),
        "a_logit": jnp.array([0.0, 0.0, 9.0, 0.0]),
    }
    apply = jax.jit(lambda p, s: module.apply({"params": p}, features, 1.0, 0.5, s))
    for step in range(4):
        r, c, a = apply(trained, jnp.asarray(step))
        np.testing.assert_allclose(r, jax.nn.sigmoid(trained["r_logit"][step]), rtol=1e-6)
        np.testing.assert_allclose(c, bounded_scale(trained["c_logit"][step], 0.2), rtol=1e-6)
        np.testing.assert_allclose(a, bounded_scale(trained["a_logit"][step], 0.1), rtol=1e-6)
    # A traced out-of-range step is loud (NaN); a concrete one raises.
    r, _, _ = apply(trained, jnp.asarray(4))
    assert bool(jnp.all(jnp.isnan(r)))
    with pytest.raises(ValueError, match="step"):
        module.apply({"params": trained}, features, 1.0, 0.5, 4)

    grads = jax.grad(lambda p: jnp.sum(apply(p, jnp.asarray(2))[0]))(trained)
    assert float(grads["r_logit"][2]) > 0
    np.testing.assert_array_equal(grads["r_logit"][jnp.array([0, 1, 3])], 0.0)


def test_stepwise_without_optional_heads():
    module = StepwisePredictor(num_steps=3)
    params = init_predictor(module, jax.random.PRNGKey(0))
    assert set(params) == {"r_logit"}
    _, c, a = module.apply({"params": params}, jnp.zeros((2, 1)), 1.0, 0.5, 1)
    np.testing.assert_array_equal(c, 1.0)
    np.testing.assert_array_equal(a, 1.0)


@pytest.mark.parametrize(
    "module",
    [
        AmedPredictor(),
        AmedPredictor(scale_dir=0.05, scale_time=0.5, hidden=32, time_channels=6, feature_out=3),
        StepwisePredictor(num_steps=5),
        StepwisePredictor(num_steps=2, scale_dir=0.1, scale_time=0.25),
    ],
)
def test_settings_round_trip(module):
    settings = predictor_settings(module)
    rebuilt = predictor_from_settings(json.loads(json.dumps(settings)))
    assert type(rebuilt) is type(module)
    assert rebuilt == module
    assert predictor_settings(rebuilt) == settings


def test_settings_defaults():
    assert predictor_from_settings({"kind": "bottleneck"}) == AmedPredictor()
    assert predictor_from_settings({"kind": "stepwise", "num_steps": 3}) == StepwisePredictor(3)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"kind": "unet"}, "kind"),
        ({}, "kind"),
        ({"kind": "bottleneck", "scale_dir": 1.0}, "scale_dir"),
        ({"kind": "bottleneck", "scale_time": -0.1}, "scale_time"),
        ({"kind": "bottleneck", "scale_time": float("nan")}, "scale_time"),
        ({"kind": "bottleneck", "scale_dir": "0.1"}, "scale_dir"),
        ({"kind": "bottleneck", "hidden": 0}, "hidden"),
        ({"kind": "bottleneck", "hidden": 12.5}, "hidden"),
        ({"kind": "bottleneck", "hidden": True}, "hidden"),
        ({"kind": "bottleneck", "time_channels": 7}, "time_channels"),
        ({"kind": "bottleneck", "num_steps": 3}, "num_steps"),
        ({"kind": "stepwise"}, "num_steps"),
        ({"kind": "stepwise", "num_steps": -2}, "num_steps"),
        ({"kind": "stepwise", "num_steps": 3, "hidden": 4}, "hidden"),
    ],
)
def test_bad_settings_raise_naming_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        predictor_from_settings(settings)


def test_kind_error_lists_allowed_values():
    with pytest.raises(ValueError, match="bottleneck.*stepwise"):
        predictor_from_settings({"kind": "mlp"})


def test_bad_module_fields_raise_at_call():
    with pytest.raises(ValueError, match="scale_dir"):
        init_predictor(AmedPredictor(scale_dir=1.5), jax.random.PRNGKey(0), F)
    with pytest.raises(ValueError, match="num_features"):
        init_predictor(AmedPredictor(), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="num_steps"):
        init_predictor(StepwisePredictor(num_steps=0), jax.random.PRNGKey(0))
