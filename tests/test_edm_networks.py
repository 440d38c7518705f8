"""Flax ports of EDM's networks against outputs of EDM's own code (tests/fixtures/edm):
per-layer cases, the four small models (D, F, defaults, features), the published trees."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from edm_fixture_models import (
    FAST_COMPILE,
    FIXTURES,
    SMALL_MODELS,
    fixture_program,
    max_rel,
    nhwc,
    small_model,
    small_params,
)
from tolerances import EPS32

from deis_jax.models.edm import layers as L
from deis_jax.models.edm.params import (
    check_published_tree,
    params_from_state_dict,
    state_dict_to_params,
)
from deis_jax.models.edm.precond import (
    EDMPrecond,
    VPPrecond,
    edm_network_from_kwargs,
    precond_attrs,
)
from deis_jax.models.edm.topology import unet_plan

TREE_FILES = sorted(FIXTURES.glob("tree_*.json"))
LAYERS = json.loads((FIXTURES / "layers.json").read_text())["cases"]
# One layer against PyTorch's float32, relative to max(1, max |want|): another summation order
# in a block's two convolutions (measured <= 4.8e-7 on AVX-512, AVX and SSE4.2); tight enough
# to see a GroupNorm eps of 1e-5 for 1e-6 (~4.5e-6 at unit variance).
LAYER_ATOL = 16 * EPS32
# sin / cos of float32 phases of up to ~1400 rad (positions up to 998; Fourier 2 pi * 31 * 6.9)
# are off by ~phase * eps in EDM and here alike.
EMBEDDING_ATOL = 2 * 1400 * EPS32


def test_fixture_files_present():
    assert len(TREE_FILES) == 6
    for name in SMALL_MODELS:
        for suffix in (".json", ".params.npz", ".io.npz"):
            assert (FIXTURES / f"{name}_small{suffix}").is_file()


# ------------------------------------------------------------------------------ layers
@functools.cache
def _layer_arrays() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "layers.npz") as data:
        return {k: data[k] for k in data.files}


def _taps(cfg: dict) -> tuple[float, ...]:
    return tuple(cfg.get("resample_filter_normalized_1d") or (1, 1))


def _layer_module(case: dict):
    cfg = case["module"]
    kind = cfg["type"]
    if kind == "Conv2d":
        return L.Conv2d(
            cfg["out_channels"],
            cfg["kernel"],
            bias=cfg["bias"],
            up=cfg["up"],
            down=cfg["down"],
            resample_filter=_taps(cfg),
            fused_resample=cfg["fused_resample"],
        )
    if kind == "Linear":
        return L.Linear(cfg["out_features"], bias=cfg["bias"])
    if kind == "GroupNorm":
        return L.GroupNorm(cfg["eps"])
    if kind == "PositionalEmbedding":
        return L.PositionalEmbedding(cfg["num_channels"], cfg["max_positions"], cfg["endpoint"])
    if kind == "FourierEmbedding":
        return L.FourierEmbedding(cfg["num_channels"])
    subs = {s["name"]: s for s in case["submodules"]}
    skip = cfg["skip"]
    return L.UNetBlock(
        cfg["out_channels"],
        up=cfg["up"],
        down=cfg["down"],
        num_heads=cfg["num_heads"],
        skip_scale=cfg["skip_scale"],
        eps=cfg["eps"],
        resample_filter=_taps(subs["conv0"]),
        resample_proj=skip is not None and skip["kernel"] == 1,
        adaptive_scale=cfg["adaptive_scale"],
    )


def _layer_case(case_name: str):
    """``(module, variables, inputs, want)`` of a layers.npz case, in NHWC."""
    case, arrays = LAYERS[case_name], _layer_arrays()
    values = {n: arrays[f"{case_name}/{n}"] for n in case["arrays"]}
    to_nhwc = lambda a: nhwc(a) if a.ndim == 4 else a
    inputs = [to_nhwc(values.pop("x"))] + ([values.pop("emb")] if "emb" in values else [])
    want = to_nhwc(values.pop("y"))
    module = _layer_module(case)
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
    conv = {s["name"]: s for s in case["submodules"]}.get("conv0", case["module"])
    filters = {n: _taps(conv) for n in values if n.endswith("resample_filter")}
    variables = {"params": state_dict_to_params(values, expected.get("params", {}), filters)}
    return module, variables, inputs, want


@functools.cache
def _layer_results() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``case -> (got, want)`` for every layers.npz case, from one compiled program."""
    cases = {name: _layer_case(name) for name in LAYERS}

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run_all(variables):
        return {n: cases[n][0].apply(variables[n], *cases[n][2]) for n in cases}

    got = run_all({n: c[1] for n, c in cases.items()})
    return {n: (np.asarray(got[n]), c[3]) for n, c in cases.items()}


@pytest.mark.numerics
@pytest.mark.parametrize("case_name", sorted(LAYERS))
def test_layer_matches_edm(case_name):
    got, want = _layer_results()[case_name]
    assert got.dtype == np.float32 and got.shape == want.shape
    embedding = LAYERS[case_name]["module"]["type"].endswith("Embedding")
    atol = EMBEDDING_ATOL if embedding else LAYER_ATOL * max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.mark.numerics
def test_attention_layout_is_interleaved():
    """qkv channel ``head * 3d + 3c + j`` is channel c of q/k/v (j = 0/1/2) of ``head``."""
    b, hw, heads, d = 1, (2, 3), 2, 4
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(b, *hw, heads, d)).astype(np.float32) for _ in range(3))
    qkv = np.stack([q, k, v], axis=-1).reshape(b, *hw, heads * d * 3)
    got = np.asarray(L.multi_head_attention(jnp.asarray(qkv), heads))
    qf, kf, vf = (a.reshape(b, -1, heads, d) for a in (q, k, v))
    logits = np.einsum("bqhc,bkhc->bhqk", qf, kf) / np.sqrt(d)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhc->bqhc", w, vf).reshape(b, *hw, heads * d)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- small models
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_model_topology_matches_edm(name):
    """The plan's enc/dec entries are EDM's modules, in EDM's execution order."""
    m = small_model(name)
    _assert_plan_matches(m.net, m.meta["modules"])


def _assert_plan_matches(net, modules):
    by_name = {mod["name"]: mod for mod in modules}
    plan = net.model.plan
    for part, entries in (("enc", plan.enc), ("dec", plan.dec)):
        want = [n for n in by_name if n.startswith(f"model.{part}.") and n.count(".") == 2]
        assert [f"model.{part}.{e.name}" for e in entries] == want
        for e in entries:
            mod = by_name[f"model.{part}.{e.name}"]
            if mod["type"] == "UNetBlock":
                got = (e.in_channels, e.out_channels, e.up, e.down, e.num_heads)
                assert got == tuple(
                    mod[k] for k in ("in_channels", "out_channels", "up", "down", "num_heads")
                )


@pytest.mark.numerics
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_model_coefficients_match_edm(name):
    m = small_model(name)
    sigma = jnp.asarray(m.io["sigma"]).reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = (
        np.broadcast_to(np.asarray(c, np.float64), sigma.shape).ravel()
        for c in m.net.coefficients(sigma)
    )
    assert np.asarray(m.net.coefficients(sigma)[3]).dtype == np.float32
    # EDM's float32 c_noise (VP: log(1 + sigma^2), 1.3 % off the exact value at 0.002).
    np.testing.assert_allclose(c_noise, m.io["c_noise"], rtol=2e-7, atol=1e-7)
    for got, key in ((c_skip, "c_skip_f64"), (c_out, "c_out_f64"), (c_in, "c_in_f64")):
        np.testing.assert_allclose(got, m.io[key], rtol=1e-6, err_msg=key)


@pytest.mark.numerics
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_model_reproduces_edm(name):
    """D (and its variants) and F, fed EDM's c_noise (checked above), to the float32 U-Net
    tolerance of the model's depth (``SmallModel.rtol``, about 3e-5) max-abs-relative; NCSN++'s
    F to at least 5e-5 (its float32 Fourier phases, see EMBEDDING_ATOL)."""
    m = small_model(name)
    out = fixture_program(name)(small_params(name))
    keys = [k for k in ("D", "D_augment", "D_no_labels", "D_scalar_sigma") if k in m.io]
    assert sorted(keys) == sorted(k for k in m.io if k.startswith("D") and "f64" not in k)
    for key in keys:
        assert max_rel(out[key], nhwc(m.io[key])) < m.rtol, key
    assert max_rel(out["D"], nhwc(m.io["D_f64"])) < m.rtol
    f_tol = max(5e-5, m.rtol) if m.meta["precond_class"] == "VEPrecond" else m.rtol
    assert max_rel(out["F"], nhwc(m.io["F"])) < f_tol


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_bottleneck_is_sown(name):
    m = small_model(name)
    out = fixture_program(name)(small_params(name))
    kw = m.meta["constructor_kwargs"]
    low = kw["img_resolution"] >> (len(kw["channel_mult"]) - 1)
    channels = kw["model_channels"] * kw["channel_mult"][-1]
    assert out["bottleneck"].shape == (m.io["x"].shape[0], low, low, channels)
    # the AMED authors' feature: the last encoder block (enc['8x8_block3'] of the published
    # CIFAR-10 SongUNet), not the decoder's middle blocks
    assert m.net.model.plan.enc[-1].name == f"{low}x{low}_block{kw['num_blocks'] - 1}"
    np.testing.assert_array_equal(out["bottleneck"], out["last_encoder_block"])


@pytest.mark.numerics
def test_defaults_and_features():
    """EDM's defaults -- a 0-d sigma broadcast over the batch, ``None`` labels and augment
    labels as zero rows -- equal the explicit call; apply_with_features returns the
    bottleneck's channel mean, shape ``(B, H_low * W_low)``. Checked on the model that has
    all three defaults (a compile per model is what these tests cost)."""
    name = "cifar10_cond_vp"
    m = small_model(name)
    out = fixture_program(name)(small_params(name))
    assert m.io["sigma_scalar"].shape == ()
    # the same network on another path (a 0-d sigma broadcast, None labels) in one program
    assert max_rel(out["D_defaults"], out["defaults"]) < m.rtol
    b, low = out["bottleneck"].shape[:2]
    assert out["features"].shape == (b, low * low) and out["features"].dtype == np.float32
    want = out["bottleneck"].mean(-1).reshape(b, -1)  # the bottleneck of the "defaults" rows
    np.testing.assert_allclose(out["features"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
def test_precond_attrs_match_pickled_attributes():
    for name in SMALL_MODELS:
        m = small_model(name)
        attrs = precond_attrs(m.net)
        want = dict(m.meta["precond_attrs"])
        want["sigma_max"] = float(want["sigma_max"])  # 'inf' in the JSON
        assert attrs == pytest.approx(want, rel=1e-7), name
    vp = small_model("cifar10_uncond_vp").net
    assert isinstance(vp, VPPrecond) and vp.sigma_min == 0.0009765625  # float32, not 0.001
    assert isinstance(small_model("imagenet64_cond_adm").net, EDMPrecond)


def test_inference_only():
    m = small_model("cifar10_uncond_vp")
    with pytest.raises(ValueError, match="train must be False"):
        jax.eval_shape(
            lambda: m.net.init(jax.random.key(0), nhwc(m.io["x"]), m.io["sigma"], train=True)
        )


# ------------------------------------------------------------------------ builder errors
@pytest.mark.parametrize(
    "precond_class, kwargs, match",
    [
        ("iDDPMPrecond", {}, r"precond_class must be one of \['VPPrecond'.*iDDPMPrecond is not"),
        ("VPPrecond", {"img_resolution": 16}, r"VPPrecond kwargs need \['img_channels'\]"),
        (
            "VPPrecond",
            {"img_resolution": 16, "img_channels": 3, "model_type": "X"},
            r"model_type must be one of \['SongUNet', 'DhariwalUNet'\], got 'X'",
        ),
        (
            "EDMPrecond",
            {"img_resolution": 16, "img_channels": 3, "embedding_type": "fourier"},
            r"unknown EDMPrecond/DhariwalUNet argument\(s\) \['embedding_type'\]",
        ),
        (
            "VEPrecond",
            {"img_resolution": 16, "img_channels": 3, "encoder_type": "skip"},
            r"SongUNet encoder_type must be one of \['standard', 'residual'\], got 'skip'",
        ),
        (
            "VEPrecond",
            {"img_resolution": 16, "img_channels": 3, "embedding_type": "x"},
            r"SongUNet embedding_type must be one of \['positional', 'fourier'\]",
        ),
        (
            "VPPrecond",
            {"img_resolution": 20, "img_channels": 3, "channel_mult": [1, 2, 2, 2]},
            r"img_resolution 20 must be divisible by 2\*\*\(len\(channel_mult\) - 1\) = 8",
        ),
    ],
)
def test_builder_errors_name_the_field(precond_class, kwargs, match):
    with pytest.raises(ValueError, match=match):
        edm_network_from_kwargs(precond_class, kwargs)


# ------------------------------------------------------------------- state dict checks
def test_state_dict_errors_name_the_entries():
    m = small_model("cifar10_cond_vp")
    sd = dict(m.state_dict)
    del sd["model.map_layer0.bias"]
    sd["model.enc.bogus.weight"] = np.zeros(3, np.float32)
    sd["model.map_label.weight"] = np.zeros((16, 11), np.float32)
    sd["model.enc.8x8_down.conv0.resample_filter"] = np.ones((1, 1, 2, 2), np.float32)
    with pytest.raises(ValueError) as err:
        params_from_state_dict(m.net, sd)
    msg = str(err.value)
    assert "1 missing (model.map_layer0.bias (64,))" in msg
    assert "1 unexpected (model.enc.bogus.weight (3,))" in msg
    assert "model.map_label.weight: (16, 11) vs the expected (16, 10)" in msg
    assert (
        "model.enc.8x8_down.conv0.resample_filter != outer(f, f) / sum(f)^2 for f = [1, 1]" in msg
    )
    sd = dict(m.state_dict)
    del sd["model.dec.16x16_up.skip.resample_filter"]
    with pytest.raises(ValueError, match=r"1 missing \(model.dec.16x16_up.skip.resample_filter\)"):
        params_from_state_dict(m.net, sd)


def test_converted_layout():
    """Conv kernels OIHW -> HWIO, linear (out, in) -> (in, out); freqs kept as a leaf."""
    m = small_model("cifar10_uncond_ve")
    p = small_params("cifar10_uncond_ve")
    w = m.state_dict["model.enc.16x16_conv.weight"]
    np.testing.assert_array_equal(p["enc"]["16x16_conv"]["weight"], w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        p["map_layer0"]["weight"], m.state_dict["model.map_layer0.weight"].T
    )
    np.testing.assert_array_equal(p["map_noise"]["freqs"], m.state_dict["model.map_noise.freqs"])


# -------------------------------------------------------------------- published trees
@pytest.mark.parametrize("tree_file", TREE_FILES, ids=lambda p: p.stem)
def test_full_size_tree_matches_published(tree_file):
    tree = json.loads(tree_file.read_text())
    net = edm_network_from_kwargs(tree["precond_class"], tree["constructor_kwargs"])
    check_published_tree(net, tree)  # names, shapes and count of parameters and buffers
    _assert_plan_matches(net, tree["modules"])
    attrs = dict(tree["precond_attrs"], sigma_max=float(tree["precond_attrs"]["sigma_max"]))
    assert precond_attrs(net) == pytest.approx(attrs, rel=1e-7)


def test_published_tree_mismatch_is_reported():
    tree = json.loads((FIXTURES / "tree_edm-cifar10-32x32-uncond-vp.json").read_text())
    kwargs = dict(tree["constructor_kwargs"], augment_dim=0)
    net = edm_network_from_kwargs(tree["precond_class"], kwargs)
    with pytest.raises(ValueError, match=r"1 missing parameters \(model.map_augment.weight\)"):
        check_published_tree(net, tree)


def test_plan_rejects_unknown_variant():
    with pytest.raises(ValueError, match=r"variant must be one of \['song', 'adm'\]"):
        unet_plan(
            "x",
            img_resolution=8,
            in_channels=3,
            out_channels=3,
            model_channels=8,
            channel_mult=(1,),
            num_blocks=1,
            attn_resolutions=(),
        )
