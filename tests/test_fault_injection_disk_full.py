"""Fault injection: the disk fills up in the middle of a compare or sample run.

``os.fsync`` of one file fails with ``ENOSPC`` (what a full disk gives a writer), after
tearing the bytes just written, as a full disk leaves them. Checked: the run stops with one
line (``io_utils.DiskFullError``) naming the file and saying that it resumes; the same
command, once there is space, finishes, computing only what was not finished (equal to an
uninterrupted run). ``main.py``'s one line for it is in ``test_bad_inputs_modes.py``.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_fault_injection_runs import compare_config, without  # noqa: E402
from test_fault_injection_sample import (  # noqa: E402
    SAMPLES,
    _npz_samples,
    fast_compile,  # noqa: F401  (module fixture: most XLA optimisations off)
    run_sample,
    sample_reference,  # noqa: F401  (fixture: an uninterrupted sample run)
    toy_model,
)

from deis_jax.common.files import DiskFullError  # noqa: E402
from deis_jax.experiments import compare as compare_mode  # noqa: E402
from deis_jax.experiments import (
    gmm,  # noqa: E402
    shard_store,  # noqa: E402
)


class FullDisk:
    """``os.fsync`` of an open file whose path satisfies ``match(path)`` -- from its
    ``after + 1``-th such call on, until :meth:`free` -- tears the file's last bytes and
    fails with ENOSPC. ``failed``: the paths it failed on."""

    def __init__(self, monkeypatch, match: Callable[[str], bool], after: int = 0):
        self.match, self.after, self.seen, self.failed, self.full = match, after, 0, [], True
        self.fsync = os.fsync
        monkeypatch.setattr(os, "fsync", self.fsync_or_full)

    def fsync_or_full(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if self.full and self.match(path):
            self.seen += 1
            if self.seen > self.after:
                self.failed.append(path)
                os.ftruncate(fd, max(0, os.fstat(fd).st_size - 7))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.fsync(fd)

    def free(self) -> None:
        """Space again."""
        self.full = False


def check_message(err: DiskFullError, path: str) -> None:
    message = str(err)
    assert "\n" not in message
    assert message == (
        f"disk full writing {path} (No space left on device): free some space and run the "
        f"same command again; it resumes where it stopped (finished results are kept)"
    )


def test_compare_stops_in_one_line_and_resumes(tmp_path, monkeypatch):
    workdir, calls, run_cell = str(tmp_path), [], gmm.run_cell

    def counted(problem, sampler, mesh):
        calls.append(sampler.method)
        return run_cell(problem, sampler, mesh)

    monkeypatch.setattr(gmm, "run_cell", counted)
    cache = os.path.join(workdir, "results.jsonl")
    disk = FullDisk(monkeypatch, lambda path: path == cache, after=1)  # at the ddim cell
    with pytest.raises(DiskFullError) as info:
        compare_mode.run(compare_config(), workdir)
    check_message(info.value, cache)
    assert calls == ["ddim"]

    disk.free()
    calls.clear()
    resumed = compare_mode.run(compare_config(), workdir)
    assert calls == ["ddim"]  # the torn ddim line is computed again, the reference is not
    os.remove(cache)
    fresh = compare_mode.run(compare_config(), workdir)  # an uninterrupted run
    assert without(resumed, "seconds") == without(fresh, "seconds")


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
