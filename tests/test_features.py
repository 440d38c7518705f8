"""The networks' bottleneck feature (for AMED): sown by both U-Nets, returned by
``apply_with_features`` and carried through the one model interface (``eps_with_features``)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tolerances import assert_close_max_rel, f32_net_rtol

import deis_jax as deis
from deis_jax.evaluation.analytic import GaussianMixture
from deis_jax.models import loading
from deis_jax.models.features import apply_with_features
from deis_jax.models.score_sde import DDPM, NCSNpp, get_model, get_model_config
from deis_jax.models.score_sde.family import apply_for_sampling
from deis_jax.sampling.wrappers import (
    eps_fn_from_model,
    eps_with_features,
    guided_eps_fn,
    supports_features,
)

NO_FEATURES = "eps_with_features needs a network that returns its bottleneck feature"
TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8)
LOWEST_RES = 4  # image_size / 2 ** (len(ch_mult) - 1)
TINY_RTOL = f32_net_rtol(10)  # the TINY networks: 10 residual blocks on the longest path
TIMES = (0.3, 0.7)  # SDE times, one per example

# (base config, prediction, schedule, name of the last middle ResBlock)
NETWORKS = {
    "ncsnpp-ve": ("ve_cifar10_ncsnpp_continuous", "score", deis.VESDE(), "ResnetBlockBigGANpp_4"),
    "ddpmpp-vp": (
        "vp_cifar10_ddpmpp_continuous",
        "eps",
        deis.VPSDE.linear(),
        "ResnetBlockBigGANpp_4",
    ),
    "ddpm-vp": ("vp_ddpm_cifar10_continuous", "eps", deis.VPSDE.linear(), "ResnetBlockDDPM_3"),
}


def tiny_config(base: str) -> ml_collections.ConfigDict:
    config = get_model_config(base)
    config.update(TINY)
    return config


def random_params(model, x, labels, seed=0, scale=0.05):
    """Random parameters with the model's tree (cheap: RNG init under jit compiles slowly)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, labels))
    assert set(shapes) == {"params"}  # sowing adds no collection to init
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32),
        shapes["params"],
    )


@functools.cache
def network(name: str):
    """A tiny network with random parameters, inputs and the labels of TIMES."""
    base, _, schedule, _ = NETWORKS[name]
    model = get_model(tiny_config(base))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
    labels = schedule.model_time(jnp.asarray(TIMES)).astype(jnp.float32)
    return model, random_params(model, x, labels), x, labels


@functools.cache
def reference(name: str):
    """The jitted plain output and the jitted ``apply_with_features`` of :func:`network`."""
    model, params, x, labels = network(name)
    plain = jax.jit(model.apply)({"params": params}, x, labels)
    out, feats = jax.jit(functools.partial(apply_with_features, model))(params, x, labels)
    return plain, out, feats


@pytest.mark.parametrize("name", NETWORKS)
def test_features_leave_the_output_unchanged_and_have_the_bottleneck_shape(name):
    model = network(name)[0]
    assert isinstance(model, DDPM if name.startswith("ddpm-") else NCSNpp)
    plain, out, feats = reference(name)
    # another jitted program (the features are an extra output): float32 rounding, not bits
    assert_close_max_rel(out, plain, TINY_RTOL)
    assert feats.shape == (2, LOWEST_RES**2) and feats.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(feats)))
    assert not np.allclose(feats[0], feats[1])  # different inputs, different features


@pytest.mark.parametrize("name", NETWORKS)
def test_features_are_the_channel_mean_of_the_last_middle_block(name):
    model, params, x, labels = network(name)
    last_mid = NETWORKS[name][3]
    _, state = model.apply(
        {"params": params},
        x,
        labels,
        capture_intermediates=lambda mdl, method: mdl.name == last_mid,
        mutable=["intermediates"],
    )
    h = state["intermediates"][last_mid]["__call__"][0]
    assert h.shape[:3] == (2, LOWEST_RES, LOWEST_RES)
    np.testing.assert_array_equal(state["intermediates"]["bottleneck"][0], h)  # what is sown
    want = np.asarray(h, np.float64).mean(axis=-1).reshape(2, -1)
    np.testing.assert_allclose(reference(name)[2], want, rtol=1e-5, atol=1e-7)
    got = apply_with_features(model, params, x, labels)[1]  # eagerly, too
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["ddpmpp-vp", "ddpm-vp"])
def test_features_carry_no_gradient(name):
    model, params, x, labels = network(name)

    def scalar(v):
        return jnp.sum(apply_with_features(model, params, v, labels)[1] ** 2)

    assert float(scalar(x)) > 0.0
    grad = jax.grad(scalar)(x)
    assert grad.shape == x.shape
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_apply_with_features_needs_a_sown_bottleneck():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x, labels, train=False):
            return nn.Dense(3)(x)

    model = Plain()
    x = jnp.ones((1, 2, 2, 3))
    params = model.init(jax.random.key(0), x, jnp.ones(1))["params"]
    with pytest.raises(ValueError, match="sows no 'bottleneck'"):
        apply_with_features(model, params, x, jnp.ones(1))


# ------------------------------------------------------------------ the model interface
@pytest.mark.parametrize("name", NETWORKS)
def test_eps_with_features_through_eps_fn_from_model(name):
    model, params, x, _ = network(name)
    _, prediction, schedule, _ = NETWORKS[name]
    apply = functools.partial(apply_for_sampling, model)
    eps_fn = eps_fn_from_model(jax.tree_util.Partial(apply, params), schedule, prediction)
    assert supports_features(eps_fn)
    # the parameters are still the pytree's leaves (arguments, not constants, under jit)
    assert len(jax.tree.leaves(eps_fn)) == len(jax.tree.leaves(params))
    ts = jnp.asarray(TIMES, jnp.float32)
    plain = jax.jit(lambda f, v: f(v, ts))(eps_fn, x)
    eps, feats = jax.jit(lambda f, v: eps_with_features(f, v, ts))(eps_fn, x)
    assert_close_max_rel(eps, plain, TINY_RTOL)  # another jitted program, as above
    np.testing.assert_allclose(feats, reference(name)[2], rtol=1e-5, atol=1e-7)
    assert feats.dtype == jnp.float32


def test_eps_with_features_through_load_model(monkeypatch):
    _, params, x, _ = network("ddpmpp-vp")
    base, prediction, schedule, _ = NETWORKS["ddpmpp-vp"]
    config = ml_collections.ConfigDict(
        {
            "model": dict(tiny_config(base)),
            "data": {"image_size": 8, "num_channels": 3, "centered": True},
            "sampling": {},
            "seed": 0,
        }
    )
    del config.model["image_size"], config.model["centered"], config.model["num_channels"]
    # the parameters of a "checkpoint" without one (an untrained init compiles slowly)
    monkeypatch.setattr(loading, "load_sampling_params", lambda config, workdir, model: params)
    loaded = loading.load_model(config, "/nonexistent", schedule)
    eps_fn = loaded.eps_fn()
    assert supports_features(eps_fn) and supports_features(loaded.bind(loaded.params))
    ts = jnp.asarray(TIMES, jnp.float32)
    eps, feats = eps_with_features(eps_fn, x, ts)
    np.testing.assert_array_equal(eps, eps_fn(x, ts))  # eager both: the same per-op kernels
    np.testing.assert_allclose(feats, reference("ddpmpp-vp")[2], rtol=1e-5, atol=1e-7)
    eps_s, feats_s = eps_with_features(eps_fn, x, jnp.asarray(0.5))  # one time for the batch
    assert eps_s.shape == x.shape and feats_s.shape == (2, LOWEST_RES**2)


def test_model_output_to_eps_converts_out_and_passes_features_through():
    schedule = deis.VPSDE.linear()
    calls = []

    def model_fn(x, cond, key=None, *, features=False):  # predicts x0 = x / 2
        calls.append((key, features))
        out = x / 2
        return (out, jnp.full((x.shape[0], 1), 7.0)) if features else out

    eps_fn = eps_fn_from_model(model_fn, schedule, "x0")
    x, t = jnp.ones((2, 3)), jnp.asarray(0.3)
    eps, feats = eps_fn(x, t, features=True)
    np.testing.assert_array_equal(eps, eps_fn(x, t))
    np.testing.assert_array_equal(feats, [[7.0], [7.0]])
    key = jax.random.key(0)
    eps_fn(x, t, key, features=True)
    assert calls[:2] == [(None, True), (None, False)] and calls[2] == (key, True)


def test_plain_functions_are_rejected_with_a_clear_message():
    schedule = deis.VPSDE.linear()
    mixture_eps = GaussianMixture.ring(4, radius=1.0, std=0.3).eps_fn(schedule)
    x, t = jnp.ones((2, 2)), jnp.asarray(0.5)

    def no_keyword(x, cond):
        return x

    def forwards_kwargs(x, cond, **kwargs):  # passes `features` on to a function without it
        return no_keyword(x, cond, **kwargs)

    def returns_an_array(x, cond, *, features=False):
        return x

    rejected = [
        mixture_eps,
        guided_eps_fn(mixture_eps, mixture_eps, 2.0),
        eps_fn_from_model(no_keyword, schedule),
    ]
    for eps_fn in rejected:
        assert not supports_features(eps_fn)
        with pytest.raises(ValueError, match=NO_FEATURES) as err:
            eps_with_features(eps_fn, x, t)
        assert "load_model" in str(err.value) and "feature-free predictor" in str(err.value)
    for model_fn in (forwards_kwargs, returns_an_array):
        eps_fn = eps_fn_from_model(model_fn, schedule)
        assert supports_features(eps_fn)  # by its signature; the call finds out
        with pytest.raises(ValueError, match=NO_FEATURES):
            eps_with_features(eps_fn, x, t)
        with pytest.raises(ValueError, match=NO_FEATURES):  # also at trace time
            jax.jit(lambda f: eps_with_features(f, x, t))(eps_fn)
