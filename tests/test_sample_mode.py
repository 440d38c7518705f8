"""``--mode=sample`` (``deis_jax.experiments.sample``) under faults: killed and restarted, a newer
checkpoint between runs, damaged outputs repaired, NaN samples never written, a full disk;
the sample identity names what changes a sample."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest
from damage import FullDisk, check_message
from test_shard_store import (
    DAMAGES,
    Interrupt,
    _damage_three_shards,
    fast_compile,  # noqa: F401  (module fixture: most XLA optimisations off)
    truncate,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs import vpsde_digits  # noqa: E402
from deis_jax.common.files import DiskFullError, sha256_file  # noqa: E402
from deis_jax.common.identity import tree_digest  # noqa: E402
from deis_jax.experiments import generation, shard_store  # noqa: E402
from deis_jax.experiments import sample as sample_mode  # noqa: E402
from deis_jax.models.loading import LoadedModel  # noqa: E402
from deis_jax.sampling.diagnostics import NonFiniteSamplesError  # noqa: E402


def tiny_config():
    config = vpsde_digits.get_config()
    config.model.nf = 8
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.data.image_size = 8
    config.sampler.nfe = 4
    config.sampling.num_samples = 6
    config.sampling.batch_size = 2
    config.sampling.shard_size = 2
    return config


def toy_model(scale: float, step: int) -> LoadedModel:
    """A linear eps network with the identity ``load_model`` gives the EMA parameters of
    ``<workdir>/checkpoints/<step>``."""
    params = {"scale": np.float32(scale)}
    identity = {"workdir_step": step, "params_sha256": tree_digest(params)}
    return LoadedModel(lambda p: lambda x, t: p["scale"] * x, params, identity)


SAMPLES = os.path.join("samples", "tab3_nfe4_quadratic")


def run_sample(workdir, model):
    """``--mode=sample`` in this process with ``model`` as the checkpoint's network."""
    config = tiny_config()
    return sample_mode.run(config, str(workdir), sample_mode.validate(config), model=model)


def _npz_samples(workdir):
    with np.load(os.path.join(workdir, SAMPLES, sample_mode.NPZ_FILE)) as f:
        return f["samples"]


@pytest.fixture(scope="module")
def sample_reference(tmp_path_factory):
    """An uninterrupted ``--mode=sample`` run with the step-2 model: ``(workdir, samples)``."""
    workdir = tmp_path_factory.mktemp("sample_reference")
    run_sample(workdir, toy_model(0.5, step=2))
    return workdir, _npz_samples(workdir)


def test_sample_mode_kill_restart_and_newer_checkpoint(sample_reference, tmp_path, monkeypatch):
    workdir = tmp_path / "digits"
    real = generation.generate_samples

    def killed_after_shard_0(*args, **kwargs):
        def hook(k, path):
            if k == 0:
                raise Interrupt

        return real(*args, on_shard=hook, **kwargs)

    monkeypatch.setattr(generation, "generate_samples", killed_after_shard_0)
    with pytest.raises(Interrupt):
        run_sample(workdir, toy_model(0.5, step=2))
    monkeypatch.setattr(generation, "generate_samples", real)
    shards = workdir / SAMPLES / "shards"
    assert sorted(p.name for p in shards.glob("shard_*.npz")) == [shard_store.shard_name(0)]

    # Training has since written a newer checkpoint: other parameters at step 4.
    newer = toy_model(0.25, step=4)
    with pytest.raises(shard_store.DifferentRunError) as err:
        run_sample(workdir, newer)
    message = str(err.value)
    old_digest, new_digest = (
        toy_model(0.5, 2).identity["params_sha256"],
        newer.identity["params_sha256"],
    )
    assert (
        f"metadata.model.params_sha256: {old_digest[:12]}… (on disk) vs {new_digest[:12]}… "
        f"(this run)" in message
    )
    assert "metadata.model.workdir_step: 2 (on disk) vs 4 (this run)" in message
    assert str(shards) in message and "delete" in message

    # Even with spec.json torn, the shard's own identity refuses the newer parameters.
    truncate(shards / shard_store.SPEC_FILE)
    with pytest.raises(shard_store.DifferentRunError, match="params_sha256"):
        run_sample(workdir, newer)
    assert not (workdir / SAMPLES / sample_mode.NPZ_FILE).exists()

    run_sample(workdir, toy_model(0.5, step=2))  # the same command as the killed run
    np.testing.assert_array_equal(_npz_samples(workdir), sample_reference[1])


@pytest.mark.parametrize("damage", [*DAMAGES, "shards"])
def test_sample_mode_repairs_damaged_outputs(damage, sample_reference, tmp_path, caplog):
    workdir = tmp_path / "digits"
    shutil.copytree(sample_reference[0], workdir)
    if damage == "shards":
        _damage_three_shards(workdir / SAMPLES / "shards", sidecars=False)
        named = [shard_store.shard_name(0), shard_store.shard_name(1)]
    else:
        DAMAGES[damage](workdir / SAMPLES / sample_mode.NPZ_FILE)
        named = [] if damage == "delete" else [sample_mode.NPZ_FILE]
    with caplog.at_level(logging.INFO):
        run_sample(workdir, toy_model(0.5, step=2))
    assert all(f"{name} is damaged" in caplog.text for name in named)
    np.testing.assert_array_equal(_npz_samples(workdir), sample_reference[1])
    shards = shard_store.load_samples(str(workdir / SAMPLES / "shards")).samples
    np.testing.assert_array_equal(shards, sample_reference[1])


def test_sample_mode_never_writes_nan_samples(tmp_path):
    with pytest.raises(NonFiniteSamplesError) as err:
        run_sample(tmp_path, toy_model(float("nan"), step=2))
    assert shard_store.shard_name(0) in str(err.value) and "[0, 1]" in str(err.value)
    folder = tmp_path / SAMPLES
    assert not list(folder.rglob("shard_*.npz")) and not (folder / sample_mode.NPZ_FILE).exists()


def test_sample_identity_names_what_changes_a_sample(tmp_path):
    model = toy_model(0.5, step=2)
    config = tiny_config()
    base = sample_mode.sample_identity(config, model)
    assert base["model"]["params_sha256"] == model.identity["params_sha256"]
    assert base["predictor_sha256"] is None

    def identity_with(field, value):
        changed = tiny_config()
        changed.update_from_flattened_dict({field: value})
        return sample_mode.sample_identity(changed, model)

    same = {"sampling.num_samples": 60, "sampling.batch_size": 3, "training.n_iters": 7,
            "data.data_dir": "/elsewhere"}  # fmt: skip
    for field, value in same.items():
        assert identity_with(field, value) == base, field
    other = {"sampler.t0": 2e-3, "sde.beta_max": 19.0, "seed": 1, "data.centered": False,
             "sampling.shard_size": 5, "model.nf": 16}  # fmt: skip
    for field, value in other.items():
        assert identity_with(field, value) != base, field

    predictor = tmp_path / "amed.json"
    predictor.write_text(json.dumps({"weights": [1, 2]}))
    config.sampler.predictor_file = str(predictor)
    first = sample_mode.sample_identity(config, model)["predictor_sha256"]
    assert first == sha256_file(str(predictor))
    predictor.write_text(json.dumps({"weights": [1, 3]}))  # retrained predictor, same path
    assert sample_mode.sample_identity(config, model)["predictor_sha256"] != first


def test_sample_stops_in_one_line_and_resumes(sample_reference, tmp_path, monkeypatch):  # noqa: F811
    workdir = tmp_path / "digits"
    shard1 = str(workdir / SAMPLES / "shards" / shard_store.shard_name(1))
    disk = FullDisk(monkeypatch, lambda path: shard_store.shard_name(1) in os.path.basename(path))
    with pytest.raises(DiskFullError) as info:
        run_sample(workdir, toy_model(0.5, step=2))
    check_message(info.value, shard1)
    assert disk.failed and not os.path.exists(disk.failed[0])  # the torn temporary file is gone
    shard0 = workdir / SAMPLES / "shards" / shard_store.shard_name(0)
    written = os.stat(shard0).st_mtime_ns
    assert not os.path.exists(shard1)

    disk.free()
    run_sample(workdir, toy_model(0.5, step=2))  # the same command
    assert os.stat(shard0).st_mtime_ns == written  # shard 0 was kept, not recomputed
    np.testing.assert_array_equal(_npz_samples(workdir), sample_reference[1])
