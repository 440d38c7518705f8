"""score_sde checkpoint import, the conversion script and the converted (Orbax) format."""

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

from deis_jax.io_utils import sha256_file
from deis_jax.models import checkpoints
from deis_jax.models.checkpoints import flatten_tree

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "score_sde"
SMALL = "vp_cifar10_ddpmpp_continuous_small"
SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "convert_score_sde_checkpoint.py"


def _small_config():
    meta = json.loads((FIXTURES / f"{SMALL}.json").read_text())
    values = dict(meta["model_config"])
    values.update({k: meta["data_config"][k] for k in ("image_size", "num_channels", "centered")})
    return ml_collections.ConfigDict(values)


@pytest.fixture(scope="module")
def small_params():
    return serialization.msgpack_restore((FIXTURES / f"{SMALL}.params.msgpack").read_bytes())


def _score_sde_state(params_ema, target):
    """A training state laid out like score_sde's ``flax.serialization.to_state_dict(State)``."""
    zeros = jax.tree.map(np.zeros_like, target)
    return {
        "step": np.asarray(400000),
        "optimizer": {
            "target": target,
            "state": {
                "step": np.asarray(400000),
                "param_states": jax.tree.map(lambda z: {"grad_ema": z, "grad_sq_ema": z}, zeros),
            },
        },
        "lr": np.asarray(2e-4, np.float32),
        "model_state": {},
        "ema_rate": np.asarray(0.9999, np.float32),
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
    params = checkpoints.load_score_sde_params(score_sde_checkpoint, _small_config())
    _assert_trees_equal(params, small_params)
    target = checkpoints.load_score_sde_params(score_sde_checkpoint, _small_config(), use_ema=False)
    _assert_trees_equal(target, jax.tree.map(lambda x: x + np.float32(1.0), small_params))


def test_convert_script_roundtrip(tmp_path, score_sde_checkpoint, small_params, capsys):
    out = tmp_path / "converted"
    script = _load_script()
    config_json = str(FIXTURES / f"{SMALL}.json")
    argv = ["--checkpoint", str(score_sde_checkpoint), "--model_config", config_json]
    assert script.main([*argv, "--out", str(out)]) == 0
    assert "wrote 317,699 parameters (params_ema)" in capsys.readouterr().out
    reloaded = checkpoints.load_params(out, _small_config())
    _assert_trees_equal(reloaded, small_params)

    meta = checkpoints.load_params_metadata(out)
    assert meta["format"] == "deis_jax.params"
    assert meta["num_params"] == 317_699
    assert meta["source_params"] == "params_ema"
    assert meta["source_sha256"] == sha256_file(score_sde_checkpoint)
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
        checkpoints.load_score_sde_params(path, _small_config())
    msg = str(err.value)
    # sorted order: .../Conv_0/kernel (missing) comes before .../Conv_0/weight (unexpected)
    assert "missing parameter 'ResnetBlockBigGANpp_3/Conv_0/kernel'" in msg
    assert "1 missing, 1 unexpected" in msg


def test_reshaped_leaf_is_reported_with_both_shapes(tmp_path, small_params):
    bad = copy.deepcopy(small_params)
    bad["AttnBlockpp_0"]["NIN_0"]["W"] = np.zeros((32, 16), np.float32)
    path = _write_checkpoint(tmp_path / "checkpoint_1", _score_sde_state(bad, small_params))
    with pytest.raises(ValueError) as err:
        checkpoints.load_score_sde_params(path, _small_config())
    msg = str(err.value)
    assert "'AttnBlockpp_0/NIN_0/W'" in msg
    assert "(32, 16)" in msg and "(32, 32)" in msg


def test_wrong_model_config_name_fails_clearly(score_sde_checkpoint):
    with pytest.raises(ValueError, match="shape mismatch at '"):
        checkpoints.load_score_sde_params(score_sde_checkpoint, "vp_cifar10_ddpmpp_continuous")


def test_not_a_score_sde_state(tmp_path, small_params):
    path = _write_checkpoint(tmp_path / "checkpoint_2", {"params": small_params})
    with pytest.raises(ValueError, match="params_ema"):
        checkpoints.load_score_sde_params(path, _small_config())
    path = tmp_path / "garbage"
    path.write_bytes(b"\x00not msgpack")
    with pytest.raises(ValueError, match="not a readable score_sde checkpoint"):
        checkpoints.load_score_sde_params(path, _small_config())


def test_converted_tree_is_checked_on_load(tmp_path, small_params):
    bad = copy.deepcopy(small_params)
    del bad["Dense_1"]["bias"]
    checkpoints.save_params(tmp_path / "p", bad)
    assert checkpoints.load_params(tmp_path / "p")["Dense_0"]["bias"].shape == (64,)
    with pytest.raises(ValueError, match="missing parameter 'Dense_1/bias'"):
        checkpoints.load_params(tmp_path / "p", _small_config())


# ---------------------------------------------------------------------------- missing files
def test_missing_score_sde_checkpoint_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        checkpoints.load_score_sde_params(
            tmp_path / "checkpoint_8", "vp_cifar10_ddpmpp_deep_continuous"
        )
    msg = str(err.value)
    assert "yang-song/score_sde" in msg and "checkpoints/" in msg and "checkpoint_8" in msg


def test_directory_instead_of_file_lists_candidates(tmp_path):
    (tmp_path / "checkpoint_8").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="checkpoint_8"):
        checkpoints.load_score_sde_state(tmp_path)


def test_missing_converted_params_point_to_the_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_score_sde_checkpoint.py"):
        checkpoints.load_params(tmp_path / "nothing_here")
