"""One run per workdir: an exclusive lock, ``<workdir>/.deis_jax.lock``, held while a mode runs.

Two runs writing one workdir corrupt each other's files (two ``--mode=train`` processes both
crashed inside Orbax). :func:`workdir_lock` takes an ``fcntl.flock`` on the lock file and
writes the owner into it (pid, host, UTC start time, mode); a second process is refused with
:class:`WorkdirLockedError`, one line naming the owner and the lock file.

* **Released** when the run ends, by error too: the file is deleted.
* **A crash** (kill -9, power loss) cannot leave a held lock: the kernel drops a flock when
  its process dies. The owner record stays in the file; the next run takes the lock over,
  logging a warning that names the dead owner (stale lock).
* **Multi-process runs** (``jax.distributed``, several processes on one shared workdir):
  process 0 takes the lock for the run; every process then learns whether it got it (one
  all-gather), so a refused run stops on every process instead of waiting in a collective.
* A filesystem without ``flock`` (some network mounts) gets a warning and no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator

LOCK_FILE = ".deis_jax.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)
_log = logging.getLogger(__name__)


class WorkdirLockedError(RuntimeError):
    """Another process runs a mode on this workdir; the message names it and the lock file."""


def lock_path(workdir: str) -> str:
    """The lock file of ``workdir``."""
    return os.path.join(os.path.abspath(workdir), LOCK_FILE)


def owner_record(mode: str | None = None) -> dict:
    """Who holds a lock: this process's pid, host, start time (UTC) and ``mode``."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": now, "mode": mode}


def describe_owner(record: dict | None) -> str:
    """``'--mode=train, pid 123 on host, since 2025-01-01 10:00:00 UTC'`` (what is known)."""
    if not record:
        return "a process that has not recorded itself yet"
    mode = f"--mode={record['mode']}, " if record.get("mode") else ""
    return f"{mode}pid {record.get('pid')} on {record.get('host')}, since {record.get('since')}"


def _read_record(fd: int) -> dict | None:
    """The owner record in the open lock file (None: empty or unreadable)."""
    try:
        text = os.pread(fd, 4096, 0).decode()
        record = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _pid_alive(pid) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # it runs (as another user), or the record is not a pid: assume alive
    return True


def _locked_fd(path: str) -> int | None:
    """An open descriptor of ``path`` holding its exclusive flock, or None where the
    filesystem has no flock; ``WorkdirLockedError`` when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = _read_record(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirLockedError(_refusal(path, owner)) from None
            if err.errno in _UNSUPPORTED:
                _log.warning("cannot lock %s (%s): running without the workdir lock", path, err)
                return None
            raise
        try:  # the owner that just released it deleted the file: lock the new one instead
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _refusal(path: str, owner: dict | None) -> str:
    workdir = os.path.dirname(path)
    gone = ""
    if owner and owner.get("host") == socket.gethostname() and not _pid_alive(owner.get("pid")):
        gone = "; that pid no longer runs, a process it started still holds the lock"
    return (
        f"--workdir={workdir} is in use by another deis_jax run ({describe_owner(owner)}{gone}; "
        f"lock file {path}): wait for it to finish, or use another --workdir"
    )


def acquire(workdir: str, mode: str | None = None) -> int | None:
    """Take the lock of ``workdir`` (created if missing) for this process; returns the open
    descriptor that holds it (None: no flock on this filesystem). A stale owner record (its
    process died without releasing) is taken over with a warning naming it."""
    os.makedirs(workdir, exist_ok=True)
    path = lock_path(workdir)
    fd = _locked_fd(path)
    if fd is None:
        return None
    previous = _read_record(fd)
    if previous is not None:
        _log.warning(
            "taking over the stale workdir lock %s of %s: that run ended without releasing it "
            "(killed or crashed); its finished results are kept and resumed",
            path, describe_owner(previous),
        )  # fmt: skip
    data = json.dumps(owner_record(mode)).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return fd


def release(workdir: str, fd: int | None) -> None:
    """Delete the lock file (while still holding it) and close ``fd``."""
    if fd is None:
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(workdir))
    finally:
        os.close(fd)


def _all_processes_locked(locked: bool) -> bool:
    """Whether every process of the run says ``locked`` (one all-gather; with one process,
    ``locked`` itself)."""
    from deis_jax.common import parallel

    return bool(parallel.allgather_ints([int(locked)]).all())


@contextlib.contextmanager
def workdir_lock(
    workdir: str,
    mode: str | None = None,
    *,
    process_index: int | None = None,
    all_locked: Callable[[bool], bool] = _all_processes_locked,
) -> Iterator[None]:
    """Hold the lock of ``workdir`` for the block (see the module docstring): process 0
    (``process_index``, default ``jax.process_index()``) takes it; ``all_locked(ok)`` tells
    every process whether it did. ``WorkdirLockedError`` on every process when it did not."""
    if process_index is None:
        import jax

        process_index = jax.process_index()
    fd, refused = None, None
    if process_index == 0:
        try:
            fd = acquire(workdir, mode)
        except WorkdirLockedError as err:
            refused = err
    try:
        if not all_locked(refused is None):
            raise refused or WorkdirLockedError(
                f"--workdir={workdir}: process 0 of this run could not lock {lock_path(workdir)} "
                f"(another run uses the workdir; process 0's error names it)"
            )
        yield
    finally:
        release(workdir, fd)
