"""score_sde checkpoint import (``models/score_sde/published.py``), the conversion script and
the converted (Orbax) format (``models/checkpoints.py``)."""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import serialization
from tolerances import SCORE_SDE_FIXTURE_RTOL

from deis_jax.common.files import sha256_file
from deis_jax.models import checkpoints
from deis_jax.models.checkpoints import flatten_tree
from deis_jax.models.score_sde import get_model, published

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "score_sde"
SMALL = "vp_cifar10_ddpmpp_continuous_small"
SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "convert_score_sde_checkpoint.py"


def _small_config(name=SMALL):
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    values = dict(meta["model_config"])
    values.update({k: meta["data_config"][k] for k in ("image_size", "num_channels", "centered")})
    return ml_collections.ConfigDict(values)


def _fixture_params(name=SMALL):
    return serialization.msgpack_restore((FIXTURES / f"{name}.params.msgpack").read_bytes())


@pytest.fixture(scope="module")
def small_params():
    return _fixture_params()


def _score_sde_state(params_ema, target):
    """A training state laid out as flax 0.3.1's ``save_checkpoint`` wrote score_sde's.

    ``to_state_dict`` of score_sde's ``State(step, optimizer, lr, model_state, ema_rate,
    params_ema, rng)``: ``step`` an int32 device scalar, ``optimizer`` flax.optim's Adam
    ``{target, state: {step, param_states}}`` with one ``{grad_ema, grad_sq_ema}`` per
    parameter, ``lr`` and ``ema_rate`` the config's Python floats, ``model_state`` the (empty)
    non-parameter collections, ``rng`` a raw uint32 key.
    """
    step = np.asarray(400_000, np.int32)
    moments = jax.tree.map(lambda x: {"grad_ema": x * 0.1, "grad_sq_ema": x * x}, target)
    return {
        "step": step,
        "optimizer": {"target": target, "state": {"step": step, "param_states": moments}},
        "lr": 2e-4,
        "model_state": {},
        "ema_rate": 0.9999,
        "params_ema": params_ema,
        "rng": np.asarray([0, 42], np.uint32),
    }


def _write_checkpoint(path, state):
    path.write_bytes(serialization.msgpack_serialize(state))
    return path


def _assert_trees_equal(a, b):
    fa, fb = flatten_tree(a), flatten_tree(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


@pytest.fixture
def score_sde_checkpoint(tmp_path, small_params):
    target = jax.tree.map(lambda x: x + np.float32(1.0), small_params)
    return _write_checkpoint(tmp_path / "checkpoint_8", _score_sde_state(small_params, target))


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_score_sde_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------ score_sde import
def test_load_score_sde_params_takes_params_ema(score_sde_checkpoint, small_params):
    params = published.load_score_sde_params(score_sde_checkpoint, _small_config())
    _assert_trees_equal(params, small_params)
    target = published.load_score_sde_params(score_sde_checkpoint, _small_config(), use_ema=False)
    _assert_trees_equal(target, jax.tree.map(lambda x: x + np.float32(1.0), small_params))


def test_convert_script_roundtrip(tmp_path, score_sde_checkpoint, small_params, capsys):
    out = tmp_path / "converted"
    script = _load_script()
    config_json = str(FIXTURES / f"{SMALL}.json")
    argv = ["--checkpoint", str(score_sde_checkpoint), "--model_config", config_json]
    assert script.main([*argv, "--out", str(out)]) == 0
    assert "wrote 317,699 parameters (params_ema)" in capsys.readouterr().out
    reloaded = published.load_converted_params(out, _small_config())
    _assert_trees_equal(reloaded, small_params)

    meta = checkpoints.load_params_metadata(out)
    assert meta["format"] == "deis_jax.params"
    assert meta["num_params"] == 317_699
    assert meta["source_params"] == "params_ema"
    assert meta["source_sha256"] == sha256_file(score_sde_checkpoint)
    assert meta["converted_leaves"] == {}  # written in today's layout: nothing to convert
    assert (meta["source_step"], meta["source_ema_rate"]) == (400_000, 0.9999)
    assert meta["model_config"]["centered"] is True

    with pytest.raises(FileExistsError):  # refuses to overwrite silently
        script.main([*argv, "--out", str(out)])
    assert script.main([*argv, "--out", str(out), "--overwrite", "--use_target"]) == 0
    _assert_trees_equal(
        checkpoints.load_params(out), jax.tree.map(lambda x: x + np.float32(1.0), small_params)
    )


def test_convert_script_rejects_unknown_config_names(tmp_path, score_sde_checkpoint):
    script = _load_script()
    with pytest.raises(ValueError, match="vp_cifar10_ddpmpp_deep_continuous"):
        script.main(
            [
                "--checkpoint",
                str(score_sde_checkpoint),
                "--model_config",
                "cifar10_ddpmpp",
                "--out",
                str(tmp_path / "o"),
            ]
        )


# ---------------------------------------------------------------------- mismatch messages
def test_renamed_leaf_is_reported_by_path(tmp_path, small_params):
    bad = copy.deepcopy(small_params)
    bad["ResnetBlockBigGANpp_3"]["Conv_0"]["weight"] = bad["ResnetBlockBigGANpp_3"]["Conv_0"].pop(
        "kernel"
    )
    path = _write_checkpoint(tmp_path / "checkpoint_1", _score_sde_state(bad, small_params))
    with pytest.raises(ValueError) as err:
        published.load_score_sde_params(path, _small_config())
    msg = str(err.value)
    # the renamed leaf is the cause named, not the missing one that sorts first
    assert "unexpected parameter 'ResnetBlockBigGANpp_3/Conv_0/weight'" in msg
    assert "'weight' is not a parameter name the model uses" in msg
    assert "1 missing, 1 unexpected, 0 with the wrong shape" in msg
    assert "looks like an unknown file layout" in msg
    assert "looks like a different model config" not in msg


def test_reshaped_leaf_is_reported_with_both_shapes(tmp_path, small_params):
    bad = copy.deepcopy(small_params)
    bad["AttnBlockpp_0"]["NIN_0"]["W"] = np.zeros((32, 16), np.float32)
    path = _write_checkpoint(tmp_path / "checkpoint_1", _score_sde_state(bad, small_params))
    with pytest.raises(ValueError) as err:
        published.load_score_sde_params(path, _small_config())
    msg = str(err.value)
    assert "shape mismatch at 'AttnBlockpp_0/NIN_0/W'" in msg
    assert "has (32, 16), the model expects (32, 32)" in msg
    assert "looks like a different model config" in msg  # same rank: a channel count differs


def test_wrong_model_config_name_fails_clearly(score_sde_checkpoint):
    with pytest.raises(ValueError, match="shape mismatch at '") as err:
        published.load_score_sde_params(score_sde_checkpoint, "vp_cifar10_ddpmpp_continuous")
    assert "is the model config the one the checkpoint was trained with?" in str(err.value)


def test_not_a_score_sde_state(tmp_path, small_params):
    path = _write_checkpoint(tmp_path / "checkpoint_2", {"params": small_params})
    with pytest.raises(ValueError, match="params_ema"):
        published.load_score_sde_params(path, _small_config())
    path = tmp_path / "garbage"
    path.write_bytes(b"\x00not msgpack")
    with pytest.raises(ValueError, match="not a readable score_sde checkpoint"):
        published.load_score_sde_params(path, _small_config())


def test_converted_tree_is_checked_on_load(tmp_path, small_params):
    bad = copy.deepcopy(small_params)
    del bad["Dense_1"]["bias"]
    checkpoints.save_params(tmp_path / "p", bad)
    assert checkpoints.load_params(tmp_path / "p")["Dense_0"]["bias"].shape == (64,)
    with pytest.raises(ValueError, match="missing parameter 'Dense_1/bias'"):
        published.load_converted_params(tmp_path / "p", _small_config())


# ---------------------------------------------------------------------------- missing files
def test_missing_score_sde_checkpoint_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        published.load_score_sde_params(
            tmp_path / "checkpoint_8", "vp_cifar10_ddpmpp_deep_continuous"
        )
    msg = str(err.value)
    assert "yang-song/score_sde" in msg and "checkpoints/" in msg and "checkpoint_8" in msg


def test_directory_instead_of_file_lists_candidates(tmp_path):
    (tmp_path / "checkpoint_8").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="checkpoint_8"):
        published.load_score_sde_state(tmp_path)


def test_missing_converted_params_point_to_the_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_score_sde_checkpoint.py"):
        checkpoints.load_params(tmp_path / "nothing_here")


# --------------------------------------------------- score_sde files as published (flax 0.3.1)
SMALL_MODELS = [SMALL, "ve_cifar10_ncsnpp_continuous_small"]


def _old_layout(params):
    """``params`` as flax 0.3 stored them: every GroupNorm ``scale``/``bias`` as (1, 1, 1, C)."""

    def leaf(path, x):
        return x.reshape(1, 1, 1, -1) if path[-2].key.startswith("GroupNorm") else x

    return jax.tree_util.tree_map_with_path(leaf, params)


def _num_norm_leaves(params):
    return sum("/GroupNorm" in f"/{path}" for path in flatten_tree(params))


def _published_checkpoint(tmp_path, name=SMALL):
    """``(file, params_ema, target)``: a checkpoint of fixture model ``name`` as score_sde
    published it (old layout, both parameter sets; target = params_ema + 1e-3)."""
    ema = _fixture_params(name)
    target = jax.tree.map(lambda x: x + np.float32(1e-3), ema)
    state = _score_sde_state(_old_layout(ema), _old_layout(target))
    return _write_checkpoint(tmp_path / "checkpoint_26", state), ema, target


def _assert_reproduces_golden(name, params_list):
    """Each parameter set reproduces the fixture's golden outputs (as in test_models)."""
    model = get_model(_small_config(name))
    io = np.load(FIXTURES / f"{name}.io.npz")
    apply = jax.jit(lambda p: model.apply({"params": p}, io["x"], io["t"], train=False))
    with jax.default_matmul_precision("highest"):
        for params in params_list:
            y = np.asarray(apply(params))
            assert y.dtype == np.float32 and y.shape == io["y"].shape
            rel = np.max(np.abs(y - io["y"])) / np.max(np.abs(io["y"]))
            assert rel < SCORE_SDE_FIXTURE_RTOL, rel


def test_published_state_is_written_as_flax_0_3_did(tmp_path):
    path, ema, _ = _published_checkpoint(tmp_path)
    state = published.load_score_sde_state(path)
    assert sorted(state) == sorted(published.SCORE_SDE_LAYOUT)
    assert type(state["lr"]) is float and type(state["ema_rate"]) is float
    assert state["model_state"] == {} and state["step"].dtype == np.int32
    optimizer = state["optimizer"]
    moments = optimizer["state"]["param_states"]["GroupNorm_0"]["scale"]
    for leaf in (
        state["params_ema"]["GroupNorm_0"]["scale"],
        optimizer["target"]["GroupNorm_0"]["scale"],
        moments["grad_ema"],
    ):
        assert leaf.shape == (1, 1, 1, 16)
    assert _num_norm_leaves(ema) == 68  # 34 GroupNorms: scale and bias


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_published_file_loads_and_reproduces_golden_outputs(tmp_path, name, capsys):
    path, ema, _ = _published_checkpoint(tmp_path, name)
    params = published.load_score_sde_params(path, _small_config(name))
    _assert_trees_equal(params, ema)

    out = tmp_path / "converted"
    config_json = str(FIXTURES / f"{name}.json")
    script = _load_script()
    assert (
        script.main(["--checkpoint", str(path), "--model_config", config_json, "--out", str(out)])
        == 0
    )
    n = _num_norm_leaves(ema)
    assert f"; converted {n} leaves (old_groupnorm_layout)" in capsys.readouterr().out
    converted = published.load_converted_params(out, _small_config(name))
    _assert_trees_equal(converted, ema)
    _assert_reproduces_golden(name, [params, converted])

    meta = checkpoints.load_params_metadata(out)
    assert meta["converted_leaves"] == {"old_groupnorm_layout": n}
    assert meta["source_params"] == "params_ema"
    assert (meta["source_step"], meta["source_ema_rate"]) == (400_000, 0.9999)


def test_published_file_target_parameters(tmp_path):
    path, ema, target = _published_checkpoint(tmp_path)
    loaded = published.load_score_sde_params(path, _small_config(), use_ema=False)
    _assert_trees_equal(loaded, target)
    params, provenance = published.import_score_sde_params(path, _small_config(), use_ema=False)
    _assert_trees_equal(params, target)
    assert provenance["source_params"] == "optimizer.target"

    out = tmp_path / "converted"
    argv = ["--checkpoint", str(path), "--model_config", str(FIXTURES / f"{SMALL}.json")]
    assert _load_script().main([*argv, "--out", str(out), "--use_target"]) == 0
    _assert_trees_equal(checkpoints.load_params(out), target)
    meta = checkpoints.load_params_metadata(out)
    assert meta["source_params"] == "optimizer.target"
    assert meta["converted_leaves"] == {"old_groupnorm_layout": _num_norm_leaves(target)}


def test_really_wrong_leaf_shape_names_the_leaf_and_the_layout(tmp_path):
    ema = _old_layout(_fixture_params())
    ema["ResnetBlockBigGANpp_2"]["GroupNorm_1"]["scale"] = np.ones((1, 32, 1, 1), np.float32)
    path = _write_checkpoint(tmp_path / "checkpoint_3", _score_sde_state(ema, ema))
    with pytest.raises(ValueError) as err:
        published.load_score_sde_params(path, _small_config())
    msg = str(err.value)
    assert (
        "shape mismatch at 'ResnetBlockBigGANpp_2/GroupNorm_1/scale': score_sde params_ema "
        "has (1, 32, 1, 1), the model expects (32,)"
    ) in msg
    assert "0 missing, 0 unexpected, 1 with the wrong shape" in msg  # the others converted
    assert "looks like an unknown file layout" in msg


def test_published_file_with_another_model_config(tmp_path):
    path, _, _ = _published_checkpoint(tmp_path)
    config = _small_config()
    config.nf = 32
    with pytest.raises(ValueError) as err:
        published.load_score_sde_params(path, config)
    msg = str(err.value)
    assert (
        "shape mismatch at 'AttnBlockpp_0/GroupNorm_0/bias': score_sde params_ema has "
        "(1, 1, 1, 32), the model expects (64,) (flax 0.3's GroupNorm layout, with 32 channels)"
    ) in msg
    assert "looks like a different model config" in msg and "unknown file layout" not in msg


def test_unknown_top_level_names_the_missing_parameter_set(tmp_path, small_params):
    state = _score_sde_state(small_params, small_params)
    del state["optimizer"]
    path = _write_checkpoint(tmp_path / "checkpoint_4", state)
    with pytest.raises(ValueError) as err:
        published.load_score_sde_params(path, _small_config(), use_ema=False)
    msg = str(err.value)
    assert f"'{path}' has no 'optimizer.target'" in msg
    assert "top-level keys: ema_rate, lr, model_state, params_ema, rng, step;" in msg
    assert "it has 'params_ema': pass use_ema=True" in msg

    bare = _write_checkpoint(tmp_path / "checkpoint_5", _old_layout(small_params))
    with pytest.raises(ValueError) as err:
        published.load_score_sde_params(bare, _small_config())
    msg = str(err.value)
    assert "has no 'params_ema'" in msg and "(23 in all)" in msg
    assert "its top level holds the model's modules: it is a bare parameter tree" in msg


def test_converted_params_in_the_old_layout_point_to_the_import(tmp_path, small_params):
    checkpoints.save_params(tmp_path / "p", _old_layout(small_params))
    with pytest.raises(ValueError) as err:
        published.load_converted_params(tmp_path / "p", _small_config())
    msg = str(err.value)
    assert "shape mismatch at 'AttnBlockpp_0/GroupNorm_0/bias'" in msg
    assert "flax 0.3's GroupNorm parameters" in msg and "load_score_sde_params" in msg
