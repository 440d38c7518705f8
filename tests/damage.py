"""Damage for the fault-injection tests of the long-running modes (test_sealed_cells,
test_train, test_main_compare, test_sweep, test_table, test_fit_mode): kills, torn writes,
flipped bits, and the record comparisons that ignore timings."""

from __future__ import annotations

import csv
import errno
import glob
import json
import os
import re
from collections.abc import Callable

from deis_jax.common.files import DiskFullError


class Killed(Exception):
    """A kill between two cells / steps."""


def truncate(path) -> None:
    """Cut a file to half its size (a torn write)."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_bit(path, offset: int | None = None, bit: int = 0x04) -> None:
    """Flip one bit of a file (its middle byte by default)."""
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 if offset is None else offset] ^= bit
    open(path, "wb").write(bytes(data))


def flip_digit(path, field: str, line: int = 0) -> None:
    """Flip the lowest bit of the first non-zero digit of ``"field": <number>`` on JSON line
    ``line``: one bit, and the line is still valid JSON with another value."""
    lines = open(path, "rb").read().split(b"\n")
    match = re.search(rb'"' + field.encode() + rb'": -?[0.]*([1-9])', lines[line])
    assert match, (field, lines[line][:200])
    offset = sum(len(x) + 1 for x in lines[:line]) + match.start(1)
    flip_bit(path, offset, bit=0x01)  # a digit stays a digit
    assert json.loads(open(path, "rb").read().split(b"\n")[line])  # still valid JSON


def largest_file(folder) -> str:
    return max(glob.glob(os.path.join(folder, "**", "*"), recursive=True), key=os.path.getsize)


def without(records, *fields):
    """Records without timing fields (which differ between runs)."""
    return [{k: v for k, v in r.items() if k not in fields} for r in records]


def csv_rows(path, *drop):
    with open(path) as f:
        return without(list(csv.DictReader(f)), *drop)


def damaged_copies(path) -> list[str]:
    return sorted(glob.glob(f"{path}.damaged-*"))


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
