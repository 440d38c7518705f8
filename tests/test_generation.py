"""Resumable sharded generation: interrupted runs lose nothing and redo nothing; the manifest
is complete and verified."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from tolerances import assert_close_max_rel, solve_rtol

from deis_jax.common.files import sha256_file
from deis_jax.evaluation.analytic import GaussianMixture
from deis_jax.experiments import generation, shard_store
from deis_jax.sampling import sharded
from deis_jax.sampling.sampler import get_sampler
from deis_jax.sampling.sde import VPSDE

N, SHARD, DIM = 23, 5, 8  # 5 shards, the last one short


class Interrupt(Exception):
    pass


@pytest.fixture(autouse=True, scope="module")
def fast_compile():
    """Most XLA optimisations skipped: these tests are about files and keys, not speed."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def setup():
    schedule = VPSDE.linear()
    rng = np.random.default_rng(1)
    mixture = GaussianMixture(rng.normal(size=(3, DIM)), rng.uniform(0.2, 0.5, 3), np.ones(3))
    eps_fn = mixture.eps_fn(schedule)
    return {
        "schedule": schedule,
        "tab3": get_sampler(schedule, eps_fn, method="tab", order=3, nfe=5),
        "sddim": get_sampler(schedule, eps_fn, method="sddim", nfe=5),
    }


def _generate(out_dir, sampler, **kw):
    args = dict(
        num_samples=N, sample_shape=(DIM,), seed=3, shard_size=SHARD, per_device_batch=3,
        progress=False, metadata={"what": "test"},
    )  # fmt: skip
    args.update(kw)
    return generation.generate_samples(str(out_dir), sampler, **args)


def test_interrupted_generation_resumes_without_loss_or_rework(setup, tmp_path):
    sampler = setup["sddim"]
    full = _generate(tmp_path / "full", sampler)
    assert full.written == (0, 1, 2, 3, 4) and full.manifest is not None
    reference = shard_store.load_samples(str(tmp_path / "full")).samples

    out = tmp_path / "run"

    def stop_after_two(k, path):
        if k == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        _generate(out, sampler, on_shard=stop_after_two)
    assert sorted(os.listdir(out)) == [
        "shard_000000.npz", "shard_000000.npz.sha256", "shard_000001.npz",
        "shard_000001.npz.sha256", "spec.json",
    ]  # fmt: skip
    with pytest.raises(shard_store.IncompleteSamplesError, match="manifest"):
        shard_store.load_samples(str(out))
    mtimes = {k: os.stat(out / shard_store.shard_name(k)).st_mtime_ns for k in (0, 1)}
    # What a SIGKILL during a write leaves behind: a temporary file, never a partial shard.
    (out / ".tmp-abcshard_000002.npz").write_bytes(b"partial")

    resumed = _generate(out, sampler)
    assert resumed.skipped == (0, 1)
    assert resumed.written == (2, 3, 4)
    assert resumed.calls == -(-(N - 2 * SHARD) // 3)  # only the 13 missing samples
    assert {k: os.stat(out / shard_store.shard_name(k)).st_mtime_ns for k in (0, 1)} == mtimes
    assert not any(name.startswith(".tmp-") for name in os.listdir(out))

    loaded = shard_store.load_samples(str(out))
    np.testing.assert_array_equal(loaded.samples, reference)
    manifest = loaded.manifest
    assert manifest["count"] == N and manifest["num_shards"] == 5
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    assert manifest["sampler"]["method"] == "sddim" and manifest["sampler"]["nfe"] == 5
    assert manifest["seed"] == 3 and manifest["metadata"] == {"what": "test"}
    assert "git_revision" in manifest
    for entry in manifest["shards"]:
        assert entry["sha256"] == sha256_file(str(out / entry["file"]))

    again = _generate(out, sampler)  # everything on disk: no sampling at all
    assert again.written == () and again.calls == 0 and len(again.skipped) == 5


def test_samples_depend_only_on_the_global_index(setup, tmp_path):
    schedule = setup["schedule"]
    for name in ("tab3", "sddim"):
        sampler = setup[name]
        _generate(tmp_path / name, sampler, per_device_batch=4)
        got = shard_store.load_samples(str(tmp_path / name)).samples
        prior_key, noise_key = sharded.sample_keys(3)
        keys = jax.vmap(lambda i, k=prior_key: jax.random.fold_in(k, i))(np.arange(N))
        x_T = jax.vmap(lambda k: schedule.prior_sample(k, (DIM,)))(keys)
        direct = jax.jit(sampler)(x_T, noise_key) if sampler.stochastic else jax.jit(sampler)(x_T)
        # Same keys, different batch shape: equal up to float32 rounding (docs/scale.md).
        np.testing.assert_allclose(got, np.asarray(direct), rtol=1e-5, atol=1e-5)


def test_verification_catches_damage_and_foreign_runs(setup, tmp_path):
    sampler = setup["tab3"]
    _generate(tmp_path, sampler, postprocess=lambda x: (x * 10).astype(np.int16))
    samples = shard_store.load_samples(str(tmp_path)).samples
    assert samples.dtype == np.int16 and samples.shape == (N, DIM)
    assert generation.main(["verify", str(tmp_path)]) == 0

    with pytest.raises(shard_store.DifferentRunError, match="different generation run") as err:
        _generate(tmp_path, sampler, seed=4)
    assert "seed: 3 (on disk) vs 4 (this run)" in str(err.value)

    shard = tmp_path / shard_store.shard_name(2)
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(shard_store.IncompleteSamplesError, match="sha256"):
        shard_store.load_samples(str(tmp_path))
    assert generation.main(["verify", str(tmp_path)]) == 1  # one line on stderr, no traceback

    shard.unlink()
    with pytest.raises(shard_store.IncompleteSamplesError, match="missing"):
        shard_store.load_samples(str(tmp_path))
    assert shard_store.finalize(str(tmp_path)) is None  # refuses while shard 2 is missing
    manifest = json.loads((tmp_path / shard_store.MANIFEST_FILE).read_text())
    assert manifest["count"] == N  # the earlier manifest is left as it was


def test_more_samples_later_extends_the_same_directory(setup, tmp_path):
    sampler = setup["tab3"]
    _generate(tmp_path, sampler, num_samples=12)  # shards 0, 1 and a short shard 2
    before = os.stat(tmp_path / shard_store.shard_name(0)).st_mtime_ns
    result = _generate(tmp_path, sampler)  # now 23: shard 2 is redone, 3 and 4 are new
    assert result.skipped == (0, 1) and result.written == (2, 3, 4)
    assert os.stat(tmp_path / shard_store.shard_name(0)).st_mtime_ns == before
    assert shard_store.load_samples(str(tmp_path)).samples.shape == (N, DIM)


def test_network_parameters_are_bound_inside_the_jit(setup, tmp_path):
    # How --mode=sample binds a Flax model: eps_fn = bind(params), params a replicated argument.
    sampler = setup["tab3"]
    base_eps = sampler.eps_fn
    _generate(tmp_path / "plain", sampler)
    _generate(
        tmp_path / "bound", sampler, params={"scale": np.float32(1.0)},
        bind=lambda p: lambda x, t: p["scale"] * base_eps(x, t),
    )  # fmt: skip
    # scale 1 changes nothing but the program (the scale is an argument, the plain eps has
    # none): float32 rounding through the solve, not bit for bit
    assert_close_max_rel(
        shard_store.load_samples(str(tmp_path / "bound")).samples,
        shard_store.load_samples(str(tmp_path / "plain")).samples,
        solve_rtol(np.float32, sampler.nfe),
    )
