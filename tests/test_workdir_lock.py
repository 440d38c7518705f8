"""One run per workdir (``deis_jax.experiments.workdir_lock``): a second process is refused in
one line, naming the owner and the lock file; a lock left by a dead process is taken over with a
warning; the lock is released when the mode ends, by error too; the processes of one
multi-process run are not refused by their own lock."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from deis_jax.experiments import compare
from deis_jax.experiments import workdir_lock as wl
from deis_jax.experiments.modes import run_mode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import gmm_vpsde  # noqa: E402

HOLDER = textwrap.dedent(
    """
    import sys
    from deis_jax.experiments import workdir_lock as wl
    fd = wl.acquire(sys.argv[1], "train")
    print("locked", flush=True)
    sys.stdin.readline()
    wl.release(sys.argv[1], fd)
    """
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of ``tmp_path`` (as ``--mode=train``) until the test
    ends: its ``Popen``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.communicate("\n", timeout=60)


def test_a_second_process_is_refused_naming_the_owner_and_the_lock_file(tmp_path, holder):
    with pytest.raises(wl.WorkdirLockedError) as info:
        wl.acquire(str(tmp_path), "sample")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"--workdir={tmp_path} is in use by another deis_jax run (")
    assert f"--mode=train, pid {holder.pid} on {socket.gethostname()}, since 20" in message
    assert f"lock file {tmp_path / wl.LOCK_FILE}" in message
    assert message.endswith("wait for it to finish, or use another --workdir")
    assert json.loads((tmp_path / wl.LOCK_FILE).read_text())["pid"] == holder.pid  # untouched


def test_run_mode_is_refused_before_any_work(tmp_path, holder, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the mode ran on a locked workdir")

    monkeypatch.setattr(compare, "run", never)
    with pytest.raises(wl.WorkdirLockedError, match=f"pid {holder.pid} on"):
        run_mode("compare", gmm_vpsde.get_config(), str(tmp_path))


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "since": "2020-01-01 00:00:00 UTC",
             "mode": "train"}  # fmt: skip
    (tmp_path / wl.LOCK_FILE).write_text(json.dumps(stale))  # its flock died with it
    with caplog.at_level(logging.WARNING, logger=wl.__name__):
        fd = wl.acquire(str(tmp_path), "sample")
    try:
        assert f"taking over the stale workdir lock {tmp_path / wl.LOCK_FILE}" in caplog.text
        assert f"--mode=train, pid {dead.pid} on {socket.gethostname()}, since 2020" in (
            caplog.text
        )
        assert json.loads((tmp_path / wl.LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        wl.release(str(tmp_path), fd)
    assert not (tmp_path / wl.LOCK_FILE).exists()


@pytest.mark.parametrize("fails", [False, True])
def test_run_mode_holds_the_lock_while_the_mode_runs_and_releases_it(tmp_path, monkeypatch, fails):
    seen = []

    def run(config, workdir, plan=None):
        seen.append(json.loads((tmp_path / wl.LOCK_FILE).read_text()))
        with pytest.raises(wl.WorkdirLockedError):  # another acquisition meanwhile
            wl.acquire(workdir)
        if fails:
            raise RuntimeError("the mode failed")
        return "done"

    monkeypatch.setattr(compare, "run", run)
    if fails:
        with pytest.raises(RuntimeError, match="the mode failed"):
            run_mode("compare", gmm_vpsde.get_config(), str(tmp_path))
    else:
        assert run_mode("compare", gmm_vpsde.get_config(), str(tmp_path)) == "done"
    assert [(r["pid"], r["mode"]) for r in seen] == [(os.getpid(), "compare")]
    assert not (tmp_path / wl.LOCK_FILE).exists()  # released
    wl.release(str(tmp_path), wl.acquire(str(tmp_path)))  # and free


def test_processes_of_one_multi_process_run_are_not_refused(tmp_path):
    """Process 0 takes the lock for the run; the others take none and go on when process 0
    has it, and stop with it when it was refused."""
    with wl.workdir_lock(str(tmp_path), "sample", process_index=0, all_locked=lambda ok: ok):
        assert (tmp_path / wl.LOCK_FILE).exists()
        with wl.workdir_lock(str(tmp_path), "sample", process_index=1, all_locked=lambda ok: ok):
            pass  # process 1 of the same run: no lock of its own
        with pytest.raises(wl.WorkdirLockedError, match="process 0 of this run could not lock"):
            with wl.workdir_lock(str(tmp_path), process_index=1, all_locked=lambda ok: False):
                pass  # process 1 of another run, whose process 0 was refused
    assert not (tmp_path / wl.LOCK_FILE).exists()
