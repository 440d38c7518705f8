"""Crash-safe file output (atomic replace for whole files, fsync'ed appends for JSON lines),
the one file hash, :func:`sha256_file`, sealed JSON records (:func:`sealed_json`,
:func:`read_sealed_record`: the seal is ``deis_jax.common.identity.record_sha256``) and
:func:`move_aside` for a damaged file.

A long run never loses finished results: tables and plots are written to a temporary file in
the same directory and renamed over the target (``os.replace`` is atomic on POSIX), and
per-cell results are appended one JSON line at a time (a line cut short by a kill is ignored
when reading back). A full disk (or quota) while writing is a :class:`DiskFullError` naming
the file: what was finished before is on disk, and a rerun resumes from there.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from typing import Any

from deis_jax.common.identity import SHA256_KEY, record_sha256

# What ``np.load`` raises for a truncated, bit-flipped or otherwise damaged ``.npz`` file.
NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space left (or the disk quota used up) while writing ``path``: one line naming the
    file and saying that a rerun resumes (the writes are atomic, finished results are kept)."""

    def __init__(self, path: str, cause: OSError):
        self.path = path
        self.message = (
            f"disk full writing {path} ({cause.strerror or cause}): free some space and run "
            f"the same command again; it resumes where it stopped (finished results are kept)"
        )
        super().__init__(cause.errno, self.message)

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def disk_full_as_error(path: str) -> Iterator[None]:
    """Turn an ``ENOSPC`` / ``EDQUOT`` ``OSError`` of the block into a :class:`DiskFullError`
    naming ``path``; every other error passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as err:
        if err.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(path, err) from err
        raise


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``: :func:`sha256_file` of a file holding them."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (the one file hash of the package: checkpoints,
    classifier and Inception weights, sample shards)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sealed_json(record: dict[str, Any], **dumps_kwargs: Any) -> str:
    """``record`` with its :func:`record_sha256` added as a last ``"sha256"`` entry, as JSON
    text ending in a newline (``json.dumps`` keywords, e.g. ``indent``; NaN is refused)."""
    sealed = {**record, SHA256_KEY: record_sha256(record)}
    return json.dumps(sealed, allow_nan=False, **dumps_kwargs) + "\n"


def check_record_sha256(record: dict[str, Any], path: str, remedy: str) -> None:
    """Refuse a record read from ``path`` whose ``"sha256"`` entry is not its
    :func:`record_sha256` (a bit flipped or an edit after it was written): ``ValueError``
    naming the file, ending with ``remedy``. A record without the entry (written by hand or
    by an older deis_jax) is not checked."""
    if SHA256_KEY in record and record[SHA256_KEY] != record_sha256(record):
        raise ValueError(
            f"{path} does not match the sha256 recorded in it (damaged, or edited after it "
            f"was written): {remedy}"
        )


def read_sealed_record(path: str, fmt: str, version: int, what: str, remedy: str) -> dict:
    """The JSON record of a sealed file (:func:`sealed_json`) of format ``fmt`` at
    ``version``: ``ValueError`` naming ``path`` and ``what`` it should be when it is damaged
    JSON, another kind of file, fails its sha256 (:func:`check_record_sha256`, ending with
    ``remedy``) or has another version. The one reader of every fitted file."""
    try:
        with open(path) as f:
            record = json.load(f)
    except ValueError as err:  # JSON or UTF-8 error
        raise ValueError(f"{path} is not a valid {what} (damaged JSON: {err})") from None
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise ValueError(f"{path} is not a deis_jax {what} (format {fmt!r})")
    check_record_sha256(record, path, remedy)
    if record.get("version") != version:
        raise ValueError(f"{path} has {what} version {record.get('version')!r}; this deis_jax "
                         f"reads version {version}")  # fmt: skip
    return record


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """A temporary path next to ``path`` (same directory, same extension) for a writer that
    takes a file name; when the block ends without error the file is fsync'ed and renamed over
    ``path`` (``os.replace``: readers see the old file or the new one, never a part), otherwise
    it is removed. A killed process leaves at most a ``.tmp-*`` file; a full disk (in the
    block too) is a :class:`DiskFullError` naming ``path``.

        with atomic_output("out/samples.png") as tmp:
            image.save(tmp)
    """
    with disk_full_as_error(path):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
        os.close(fd)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give it normal permissions
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename
    (:func:`atomic_output`)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def move_aside(path: str, reason: str) -> str:
    """Rename a file that must not be used (``reason``: e.g. ``'damaged'``) to
    ``<path>.<reason>-<UTC time>`` in the same directory, keeping it for inspection; returns
    the new path."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = f"{path}.{reason}-{stamp}"
    os.replace(path, target)
    return target


def atomic_write_text(path: str, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode())


def save_figure(fig, path: str, **kwargs) -> None:
    """``fig.savefig`` through a temporary file, then an atomic rename."""
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(path)[1][1:] or "png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    """Append one record as a line; a line left without its newline by a killed writer (or
    cut short by a full disk: :class:`DiskFullError`) is terminated first, so the new record
    never merges into it."""
    line = json.dumps(record, sort_keys=True) + "\n"
    with disk_full_as_error(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "ab+") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())


def read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file; a truncated last line (killed writer) is skipped."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
