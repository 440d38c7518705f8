"""The shards of sample generation (``generation.generate_samples`` on ``shard_store``) under
faults: kill and restart; truncate, bit-flip and delete every kind of artifact; swap in another
run's shard; NaN samples. Every case must end with the samples of an uninterrupted run, bit for
bit, or a refusal naming the file or the setting -- never with damaged or foreign samples
accepted. (``--mode=sample`` under the same faults: test_sample_mode.py.)"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from deis_jax.common.files import sha256_file  # noqa: E402
from deis_jax.evaluation.analytic import GaussianMixture  # noqa: E402
from deis_jax.experiments import generation, shard_store  # noqa: E402
from deis_jax.sampling import sharded  # noqa: E402
from deis_jax.sampling.diagnostics import NonFiniteSamplesError, nonfinite_samples  # noqa: E402
from deis_jax.sampling.sampler import get_sampler  # noqa: E402
from deis_jax.sampling.sde import VPSDE  # noqa: E402

N, SHARD, DIM, SEED = 11, 3, 4, 3  # 4 shards, the last one short
SHARD1 = shard_store.shard_name(1)


class Interrupt(Exception):
    """What the ``on_shard`` hook raises to kill a run after a shard."""


@pytest.fixture(autouse=True, scope="module")
def fast_compile():
    """Most XLA optimisations skipped: these tests are about files, not speed."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# --- damage -------------------------------------------------------------------------------


def truncate(path, offset=None):
    """A torn write: the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def bitflip(path, offset=None):
    """One flipped bit at ``offset`` (default: the middle of the file)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def delete(path, offset=None):
    path.unlink()


DAMAGES = {"truncate": truncate, "bitflip": bitflip, "delete": delete}


# --- generate_samples ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture_sampler():
    rng = np.random.default_rng(1)
    mixture = GaussianMixture(rng.normal(size=(3, DIM)), rng.uniform(0.2, 0.5, 3), np.ones(3))
    schedule = VPSDE.linear()
    return get_sampler(schedule, mixture.eps_fn(schedule), method="sddim", nfe=4)


def _generate(out_dir, sampler, **kw):
    args = dict(
        num_samples=N, sample_shape=(DIM,), seed=SEED, shard_size=SHARD, per_device_batch=2,
        progress=False, metadata={"params_sha256": "ab" * 32},
    )  # fmt: skip
    args.update(kw)
    return generation.generate_samples(str(out_dir), sampler, **args)


@pytest.fixture(scope="module")
def reference(mixture_sampler, tmp_path_factory):
    """An uninterrupted run: ``(directory, samples)``."""
    out = tmp_path_factory.mktemp("reference")
    _generate(out, mixture_sampler)
    return out, shard_store.load_samples(str(out)).samples


@pytest.fixture(scope="module")
def other_run(mixture_sampler, tmp_path_factory):
    """A finished run with another seed (its shards must never be accepted)."""
    out = tmp_path_factory.mktemp("other")
    _generate(out, mixture_sampler, seed=SEED + 1)
    return out


def _copy(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    return out


def _assert_equals_reference(out, reference):
    loaded = shard_store.load_samples(str(out))
    np.testing.assert_array_equal(loaded.samples, reference[1])
    for entry in loaded.manifest["shards"]:
        assert entry["sha256"] == sha256_file(str(out / entry["file"]))


def test_kill_mid_run_and_restart_is_bit_identical(mixture_sampler, reference, tmp_path):
    out = tmp_path / "run"

    def kill_after_shard_1(k, path):
        if k == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        _generate(out, mixture_sampler, on_shard=kill_after_shard_1)
    # A kill between shard 1 and its sidecar: the shard is on disk, its hash is not recorded.
    os.unlink(shard_store.sidecar_path(str(out / SHARD1)))
    resumed = _generate(out, mixture_sampler)
    assert resumed.skipped == (0,) and resumed.written == (1, 2, 3)
    _assert_equals_reference(out, reference)


def _damage_three_shards(folder, sidecars: bool) -> None:
    """Shard 0 truncated, shard 1 bit-flipped, shard 2 deleted (or their sidecars)."""
    for k, damage in enumerate(DAMAGES.values()):
        path = folder / shard_store.shard_name(k)
        damage(path.with_name(path.name + shard_store.SIDECAR_SUFFIX) if sidecars else path)


@pytest.mark.parametrize("sidecars", [False, True], ids=["shards", "sidecars"])
def test_damaged_shards_are_moved_aside_and_recomputed(
    sidecars, mixture_sampler, reference, tmp_path, caplog
):
    out = _copy(reference, tmp_path)
    manifest_before = (out / shard_store.MANIFEST_FILE).read_bytes()
    _damage_three_shards(out, sidecars)
    if not sidecars:  # a reader of the finished run is told which file and what to do
        with pytest.raises(shard_store.IncompleteSamplesError) as err:
            shard_store.load_samples(str(out))
        assert shard_store.shard_name(0) in str(err.value) and "rerun the same" in str(err.value)
    # finalize never blesses a damaged shard nor one whose hash is lost
    with caplog.at_level(logging.ERROR):
        assert shard_store.finalize(str(out)) is None
    assert (out / shard_store.MANIFEST_FILE).read_bytes() == manifest_before
    assert all(f"{shard_store.shard_name(k)}: " in caplog.text for k in range(3))

    caplog.clear()
    with caplog.at_level(logging.INFO):
        result = _generate(out, mixture_sampler)
    assert result.skipped == (3,) and result.written == (0, 1, 2)
    for k in range(3):
        aside = glob.glob(str(out / f"{shard_store.shard_name(k)}*.damaged-*"))
        if k < 2:  # the shard and its sidecar, renamed and named in the log
            assert len(aside) == 2 and all(os.path.basename(a) in caplog.text for a in aside)
            assert f"{shard_store.shard_name(k)} is damaged" in caplog.text
        else:  # deleted: nothing to move aside
            assert not aside
    _assert_equals_reference(out, reference)


# The byte flipped: the fingerprint of spec.json (it still parses), the opening brace of
# manifest.json.
FLIPPED = {shard_store.SPEC_FILE: "fingerprint", shard_store.MANIFEST_FILE: 0}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", FLIPPED)
def test_damaged_spec_or_manifest_is_rebuilt_without_recomputing(
    name, damage, mixture_sampler, reference, tmp_path, caplog
):
    out = _copy(reference, tmp_path)
    path = out / name
    offset = FLIPPED[name]
    if offset == "fingerprint":
        offset = path.read_text().index('"fingerprint": "') + len('"fingerprint": "')
    DAMAGES[damage](path, offset)
    if name == shard_store.MANIFEST_FILE:
        with pytest.raises(shard_store.IncompleteSamplesError, match=name):
            shard_store.load_samples(str(out))
    elif damage == "truncate":
        with pytest.raises(shard_store.IncompleteSamplesError, match=name):
            shard_store.finalize(str(out))

    with caplog.at_level(logging.WARNING):
        result = _generate(out, mixture_sampler)
    assert result.written == () and result.calls == 0
    if damage != "delete":
        assert f"{path} is damaged" in caplog.text
    assert (out / shard_store.SPEC_FILE).read_bytes() == (
        reference[0] / shard_store.SPEC_FILE
    ).read_bytes()
    _assert_equals_reference(out, reference)


def test_shards_of_another_run_are_never_accepted(mixture_sampler, reference, other_run, tmp_path):
    out = _copy(reference, tmp_path)
    manifest_before = (out / shard_store.MANIFEST_FILE).read_bytes()
    shard2 = shard_store.shard_name(2)
    # shard 1 with its sidecar (a consistent pair: only the fingerprint tells), shard 2 alone
    for name in (SHARD1, SHARD1 + shard_store.SIDECAR_SUFFIX, shard2):
        shutil.copy(other_run / name, out / name)
    with pytest.raises(shard_store.IncompleteSamplesError, match=SHARD1):
        shard_store.load_samples(str(out))
    assert shard_store.finalize(str(out)) is None
    assert (out / shard_store.MANIFEST_FILE).read_bytes() == manifest_before

    with pytest.raises(shard_store.DifferentRunError) as err:
        _generate(out, mixture_sampler)
    message = str(err.value)
    assert SHARD1 in message and f"seed: {SEED + 1} (on disk) vs {SEED} (this run)" in message
    assert (out / SHARD1).read_bytes() == (other_run / SHARD1).read_bytes()  # untouched
    (out / SHARD1).unlink()  # what the message says to do
    result = _generate(out, mixture_sampler)
    assert result.written == (1, 2)  # shard 2 fails its sidecar's hash: moved aside, redone
    assert glob.glob(str(out / f"{shard2}.damaged-*"))
    _assert_equals_reference(out, reference)


def test_other_parameters_are_refused_naming_params_sha256(mixture_sampler, reference, tmp_path):
    out = _copy(reference, tmp_path)
    with pytest.raises(shard_store.DifferentRunError) as err:
        _generate(out, mixture_sampler, metadata={"params_sha256": "cd" * 32})
    message = str(err.value)
    assert "metadata.params_sha256: abababababab… (on disk) vs cdcdcdcdcdcd… (this run)" in message
    assert "delete" in message and str(out) in message
    _assert_equals_reference(out, reference)  # nothing was touched


def test_nonfinite_samples_are_never_written(mixture_sampler, tmp_path):
    schedule = mixture_sampler.schedule

    def prior(key):  # NaN for the samples whose first coordinate would exceed 0.8
        x = schedule.prior_sample(key, (DIM,))
        return jax.numpy.where(x[0] > 0.8, jax.numpy.nan, x)

    x_T = sharded.prior_draws(prior, sharded.sample_keys(SEED)[0], np.arange(N))
    bad = nonfinite_samples(x_T)
    first = int(bad[0]) // SHARD
    expected = bad[bad // SHARD == first]
    assert 0 < first < N // SHARD and expected.size < SHARD  # the setup is a useful one

    with pytest.raises(NonFiniteSamplesError) as err:  # generation.NonFiniteShardError
        _generate(tmp_path, mixture_sampler, prior=prior)
    assert isinstance(err.value, generation.NonFiniteShardError)
    np.testing.assert_array_equal(err.value.indices, expected)
    message = str(err.value)
    assert shard_store.shard_name(first) in message and f"{expected.size} sample" in message
    assert f"[{', '.join(map(str, expected))}]" in message
    assert not (tmp_path / shard_store.shard_name(first)).exists()
    assert not (tmp_path / shard_store.MANIFEST_FILE).exists()
    assert all((tmp_path / shard_store.shard_name(k)).exists() for k in range(first))


# --- --mode=sample ------------------------------------------------------------------------
