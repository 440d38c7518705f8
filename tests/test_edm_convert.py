"""EDM checkpoint conversion: fixture state dict (npz + JSON, the pickle's contents) ->
scripts/convert_edm_checkpoint.py -> converted checkpoint -> load_edm_checkpoint -> same D;
and the clear messages when torch or EDM's source is missing."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import types

import numpy as np
import pytest
from edm_fixture_models import (
    SmallModel,
    fixture_program,
    max_rel,
    nhwc,
    small_model,
)

from deis_jax.common.files import sha256_file
from deis_jax.models import checkpoints
from deis_jax.models.edm.convert import convert_state_dict, load_edm_checkpoint

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "convert_edm_checkpoint.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("convert_edm_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# NCSN++ VE (its random Fourier frequencies must travel) and the conditional ADM (EDMPrecond).
@pytest.mark.parametrize("name", ["cifar10_uncond_ve", "imagenet64_cond_adm"])
def test_npz_conversion_round_trip(script, tmp_path, name):
    """npz + JSON -> the script -> checkpoint -> load_edm_checkpoint reproduces EDM's D."""
    m = small_model(name)
    npz, meta_file = SmallModel.files_of(name)
    out = tmp_path / "converted"
    meta = script.main(["--state-dict", str(npz), "--kwargs", str(meta_file), "--out", str(out)])
    assert meta["source"] == "edm" and meta["precond_class"] == m.meta["precond_class"]
    assert meta["constructor_kwargs"] == m.meta["constructor_kwargs"]
    assert meta["source_file"] == str(npz.resolve())
    assert meta["source_sha256"] == sha256_file(npz)
    want_attrs = dict(m.meta["precond_attrs"])
    want_attrs["sigma_max"] = float(want_attrs["sigma_max"])  # 'inf' in the fixture JSON
    assert meta["precond_attrs"] == pytest.approx(want_attrs, rel=1e-7)

    net, params = load_edm_checkpoint(out)
    assert net == m.net
    if name == "cifar10_uncond_ve":  # the random Fourier frequencies travel with the params
        np.testing.assert_array_equal(
            params["map_noise"]["freqs"], m.state_dict["model.map_noise.freqs"]
        )
    assert max_rel(fixture_program(name)(params)["D"], nhwc(m.io["D"])) < m.rtol


def test_attribute_mismatch_is_reported(tmp_path):
    m = small_model("cifar10_uncond_vp")
    attrs = dict(m.meta["precond_attrs"], sigma_min=0.001)
    with pytest.raises(ValueError, match=r"precond attribute sigma_min: the checkpoint has 0.001"):
        convert_state_dict("VPPrecond", m.meta["constructor_kwargs"], attrs, {}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bad_state_dict_writes_nothing(tmp_path):
    m = small_model("cifar10_uncond_vp")
    sd = {k: v for k, v in m.state_dict.items() if k != "model.map_layer1.weight"}
    with pytest.raises(ValueError, match=r"state dict of 'net.npz'.*1 missing \(model.map_layer1"):
        convert_state_dict(
            "VPPrecond", m.meta["constructor_kwargs"], {}, sd, tmp_path / "x", "net.npz"
        )
    assert not (tmp_path / "x").exists()


def test_not_an_edm_checkpoint(tmp_path):
    checkpoints.save_params(tmp_path / "other", {"w": np.zeros(2, np.float32)}, {"source": "x"})
    with pytest.raises(ValueError, match="not a converted EDM checkpoint"):
        load_edm_checkpoint(tmp_path / "other")


def test_missing_torch_gives_install_message(script, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ImportError, match=r"needs PyTorch: install it \(pip install torch"):
        script.main(["--pickle", str(tmp_path / "net.pkl"), "--out", str(tmp_path / "out")])
    with pytest.raises(ImportError, match="--edm-source"):
        script.require_torch_and_edm(None)


def test_missing_edm_source_names_the_flag(script, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"torch_utils, dnnlib not importable.*--edm-source PATH"):
        script.require_torch_and_edm(None)
    with pytest.raises(ImportError, match=r"is not a clone of https://github.com/NVlabs/edm"):
        script.require_torch_and_edm(str(tmp_path))


def test_state_dict_needs_kwargs(script, tmp_path):
    with pytest.raises(SystemExit):
        script.main(["--state-dict", "x.npz", "--out", str(tmp_path / "o")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"constructor_kwargs": {}}))
    npz = tmp_path / "sd.npz"
    np.savez(npz, a=np.zeros(1))
    with pytest.raises(ValueError, match=r"lacks \['precond_class'\]"):
        script.read_npz_state_dict(str(npz), str(bad))
