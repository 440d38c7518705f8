"""score_sde-compatible networks: parameter trees, golden outputs and building blocks."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import serialization
from tolerances import SCORE_SDE_FIXTURE_RTOL

from deis_jax.models.checkpoints import flatten_tree
from deis_jax.models.score_sde import (
    DATA_FIELDS_OF_MODEL,
    DDPM,
    KNOWN_MODEL_CONFIGS,
    NCSNpp,
    abstract_params,
    get_model,
    get_model_config,
)
from deis_jax.models.score_sde import resampling as rs

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "score_sde"
TREE_FILES = sorted(FIXTURES.glob("tree_*.json"))
SMALL_MODELS = ["vp_cifar10_ddpmpp_continuous_small", "ve_cifar10_ncsnpp_continuous_small"]


def fixture_config(meta: dict) -> ml_collections.ConfigDict:
    """Model config of a fixture: its model_config plus image_size/num_channels/centered."""
    values = dict(meta["model_config"])
    values.update({k: meta["data_config"][k] for k in DATA_FIELDS_OF_MODEL})
    return ml_collections.ConfigDict(values)


def test_fixture_files_present():
    assert len(TREE_FILES) == 5
    for name in SMALL_MODELS:
        for suffix in (".json", ".params.msgpack", ".io.npz"):
            assert (FIXTURES / f"{name}{suffix}").is_file()


# ------------------------------------------------------------------------ parameter trees
@pytest.mark.parametrize("tree_file", TREE_FILES, ids=lambda p: p.stem)
def test_parameter_tree_matches_score_sde(tree_file):
    meta = json.loads(tree_file.read_text())
    expected = {path: tuple(shape) for path, shape in meta["params"].items()}
    got = {
        path: tuple(leaf.shape)
        for path, leaf in flatten_tree(abstract_params(fixture_config(meta))).items()
    }
    assert sorted(set(expected) - set(got)) == []  # missing paths
    assert sorted(set(got) - set(expected)) == []  # unexpected paths
    assert got == expected
    assert sum(int(np.prod(s)) for s in got.values()) == meta["num_params"]


@pytest.mark.parametrize("tree_file", TREE_FILES, ids=lambda p: p.stem)
def test_known_configs_reproduce_the_trees(tree_file):
    meta = json.loads(tree_file.read_text())
    name = tree_file.stem.removeprefix("tree_")
    assert name in KNOWN_MODEL_CONFIGS
    config = get_model_config(name)
    recorded = dict(meta["model_config"])
    recorded.update({k: meta["data_config"][k] for k in DATA_FIELDS_OF_MODEL})
    for key, value in recorded.items():
        mine = config[key]
        mine = list(mine) if isinstance(mine, tuple | list) else mine
        assert mine == value, key
    assert config.sde == meta["sde"]
    assert config.continuous == meta["continuous"]


def test_config_without_a_tree_has_the_published_size():
    # score_sde's sub-VP DDPM++ uses the same model block as the VP one (61,804,419 params)
    leaves = jax.tree.leaves(abstract_params(get_model_config("subvp_cifar10_ddpmpp_continuous")))
    assert sum(int(np.prod(x.shape)) for x in leaves) == 61_804_419


# ------------------------------------------------------------------------- golden outputs
@pytest.mark.numerics
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_models_reproduce_score_sde_outputs(name):
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    config = fixture_config(meta)
    model = get_model(config)
    params = serialization.msgpack_restore((FIXTURES / f"{name}.params.msgpack").read_bytes())
    io = np.load(FIXTURES / f"{name}.io.npz")
    with jax.default_matmul_precision("highest"):
        y = np.asarray(jax.jit(model.apply)({"params": params}, io["x"], io["t"]))
    assert y.dtype == np.float32 and y.shape == io["y"].shape
    rel = np.max(np.abs(y - io["y"])) / np.max(np.abs(io["y"]))
    assert rel < SCORE_SDE_FIXTURE_RTOL, rel


# -------------------------------------------------------------------------- FIR resampling
def _upfirdn_reference(x, k, up, down, pad):
    """Direct numpy implementation of upfirdn2d (zero insertion, pad, convolve, decimate)."""
    b, h, w, c = x.shape
    z = np.zeros((b, h * up, w * up, c), x.dtype)
    z[:, ::up, ::up, :] = x
    p0, p1 = pad
    z = np.pad(z, ((0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0)), (0, 0)))
    z = z[:, max(-p0, 0) : z.shape[1] - max(-p1, 0), max(-p0, 0) : z.shape[2] - max(-p1, 0)]
    kh, kw = k.shape
    out_h, out_w = z.shape[1] - kh + 1, z.shape[2] - kw + 1
    out = np.zeros((b, out_h, out_w, c), np.float64)
    flipped = k[::-1, ::-1]
    for i in range(kh):
        for j in range(kw):
            out += flipped[i, j] * z[:, i : i + out_h, j : j + out_w, :]
    return out[:, ::down, ::down, :]


@pytest.mark.numerics
@pytest.mark.parametrize(
    "up,down,pad", [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 1, (-1, 0))]
)
def test_upfirdn2d_matches_direct_definition(up, down, pad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    k = rng.normal(size=(4, 4)).astype(np.float32)  # asymmetric: checks the kernel flip
    got = np.asarray(rs.upfirdn2d(jnp.asarray(x), k, up=up, down=down, pad=pad))
    np.testing.assert_allclose(got, _upfirdn_reference(x, k, up, down, pad), atol=1e-5)


@pytest.mark.numerics
def test_fir_resampling_preserves_constants_and_shapes():
    x = jnp.ones((1, 8, 8, 2))
    up = rs.upsample_2d(x, (1, 3, 3, 1))
    down = rs.downsample_2d(x, (1, 3, 3, 1))
    assert up.shape == (1, 16, 16, 2) and down.shape == (1, 4, 4, 2)
    np.testing.assert_allclose(up[:, 2:-2, 2:-2], 1.0, rtol=1e-6)
    np.testing.assert_allclose(down[:, 1:-1, 1:-1], 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        rs.naive_upsample_2d(jnp.arange(4.0).reshape(1, 2, 2, 1))[0, :, :, 0],
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]],
    )
    np.testing.assert_allclose(rs.naive_downsample_2d(jnp.ones((1, 4, 4, 1))), 1.0)


@pytest.mark.numerics
def test_fused_fir_convs_equal_unfused_away_from_borders():
    """upsample_conv_2d = conv(upsample_2d(x)) and conv_downsample_2d = downsample_2d(conv(x))
    up to border effects (the fused versions do not truncate the intermediate image)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
    k = (1, 3, 3, 1)

    def conv(v):
        return jax.lax.conv_general_dilated(
            v, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    with jax.default_matmul_precision("highest"):
        fused_up, plain_up = rs.upsample_conv_2d(x, w, k), conv(rs.upsample_2d(x, k))
        fused_down, plain_down = rs.conv_downsample_2d(x, w, k), rs.downsample_2d(conv(x), k)
    assert fused_up.shape == (2, 16, 16, 5) and fused_down.shape == (2, 4, 4, 5)
    np.testing.assert_allclose(fused_up[:, 2:-2, 2:-2], plain_up[:, 2:-2, 2:-2], atol=1e-4)
    np.testing.assert_allclose(fused_down[:, 1:-1, 1:-1], plain_down[:, 1:-1, 1:-1], atol=1e-4)


# ------------------------------------------------------------------------ model options
def _random_params(model, x, labels, seed=0, scale=0.05):
    """Random parameters with the model's tree (cheap: RNG init under jit compiles slowly)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, labels))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), shapes
    )


def _tiny(**overrides) -> ml_collections.ConfigDict:
    config = get_model_config("ve_cifar10_ncsnpp_continuous")
    config.update(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8)
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    "overrides",
    [
        dict(progressive="output_skip", progressive_input="input_skip", progressive_combine="cat"),
        dict(progressive="residual", progressive_input="residual", resblock_type="ddpm"),
        dict(
            fir=False,
            progressive="output_skip",
            progressive_input="input_skip",
            resblock_type="ddpm",
            conditional=False,
            skip_rescale=False,
        ),
        dict(embedding_type="positional", scale_by_sigma=True, centered=True),
    ],
    ids=["output_skip-cat", "residual-ddpm-fir", "ddpm-nofir-uncond", "positional-sigma"],
)
def test_model_options_run(overrides):
    config = _tiny(**overrides)
    model = get_model(config)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
    labels = jnp.array([3.0, 7.0])
    params = _random_params(model, x, labels)
    y = jax.jit(model.apply)({"params": params}, x, labels)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    names = set(params)
    if overrides.get("progressive_input") == "input_skip":
        # the input pyramid is resampled without a conv: that Downsample has no parameters
        assert "Combine_0" in names
        if overrides.get("resblock_type") == "ddpm":  # Downsample_0 is the (conv) resampler
            assert "Downsample_0" in names and "Downsample_1" not in names
        else:
            assert not any(n.startswith("Downsample") for n in names)
    if overrides.get("resblock_type") == "ddpm":
        assert any(n.startswith("ResnetBlockDDPMpp_") for n in names)
    if overrides.get("conditional") is False:
        assert "Dense_0" not in names


def test_parameters_are_float32_under_x64():
    """Every parameter of NCSN++ (with its NIN attention and Fourier embedding) is created in
    float32 when jax_enable_x64 is on, as the published checkpoints store them."""
    model = get_model(_tiny())
    x = jnp.zeros((1, 8, 8, 3), jnp.float32)
    with jax.enable_x64(True):
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.ones((1,))))
    dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(shapes["params"])}
    assert dtypes == {"float32"}, dtypes


def test_ddpm_network_runs():
    config = get_model_config("vp_ddpm_cifar10_continuous")
    config.update(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8)
    model = get_model(config)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    labels = jnp.array([1.0, 500.0])
    params = _random_params(model, x, labels)
    assert {"Downsample_0", "Upsample_0", "AttnBlock_0", "ResnetBlockDDPM_0"} <= set(params)
    y = jax.jit(model.apply)({"params": params}, x, labels)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))


def test_dropout_only_in_training():
    config = _tiny(dropout=0.5, ch_mult=(1,), attn_resolutions=())
    model = get_model(config)
    x = jnp.full((1, 8, 8, 3), 0.5)
    labels = jnp.array([1.0])
    params = _random_params(model, x, labels)
    apply = jax.jit(model.apply, static_argnames="train")
    eval_a = apply({"params": params}, x, labels)
    eval_b = apply({"params": params}, x, labels, train=False)
    train = apply(
        {"params": params}, x, labels, train=True, rngs={"dropout": jax.random.key(1, impl="rbg")}
    )
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(eval_a, train)


def test_get_model_builds_both_networks_and_reads_full_configs():
    assert isinstance(get_model(get_model_config("vp_ddpm_cifar10_continuous")), DDPM)
    full = ml_collections.ConfigDict(
        {"model": dict(get_model_config("ve_cifar10_ncsnpp_continuous")), "data": {}}
    )
    del full.model["centered"]
    full.data.centered = False
    model = get_model(full)
    assert isinstance(model, NCSNpp) and model.centered is False and model.fir is True


@pytest.mark.parametrize(
    "field,value",
    [
        ("name", "ncsnv2"),
        ("resblock_type", "wide"),
        ("progressive", "skip"),
        ("embedding_type", "learned"),
        ("nonlinearity", "gelu2"),
    ],
)
def test_get_model_rejects_bad_values_naming_the_field(field, value):
    config = get_model_config("vp_cifar10_ddpmpp_continuous")
    config[field] = value
    with pytest.raises(ValueError, match=field):
        get_model(config)


def test_get_model_requires_centered():
    config = ml_collections.ConfigDict(dict(get_model_config("vp_cifar10_ddpmpp_continuous")))
    del config["centered"]
    with pytest.raises(ValueError, match="centered"):
        get_model(config)
    with pytest.raises(ValueError, match="unknown model config"):
        get_model_config("vp_cifar10_ddpmpp_shallow")
