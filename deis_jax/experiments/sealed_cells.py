"""Cell caches that are checked before they are trusted: sealed records, failed cells retried.

:func:`run_sealed_cells` is :func:`deis_jax.experiments.engine.run_cells` (same arguments) with
three guarantees on top of the engine's cache ``{"key", "fingerprint", "record"}`` lines:

* **Sealed.** The cached record of a cell is ``{"result": <the cell's record>, "sha256":
  <seal>}`` where the seal is the sha256 of the canonical JSON text (keys sorted) of
  ``[key, fingerprint, result]``: a bit flipped anywhere in the line -- a digit of a result,
  the key, the fingerprint -- no longer matches.
* **Checked on resume.** Before the engine reads the cache, every line is checked
  (:func:`scrub_cache`). A line that is not a cell record (torn by a kill, garbled), or one of
  this experiment (its fingerprint) with no seal (written by an older deis_jax), a wrong seal,
  or a result that fails the caller's ``verify`` (e.g. an artifact it names is missing or
  changed) is damage: named in the log with its line number and cell key, the file is moved
  aside to ``<cache>.damaged-<UTC time>`` and rewritten without those lines, and their cells
  are computed again. Lines of other experiments (other fingerprints) are kept as they are.
* **Failures are not results.** A cell whose record has a ``"failed"`` entry (the reason, e.g.
  ``"3 of 64 samples non-finite"``) is reported as such by the mode in this run, but is never
  reused: the next run computes it again.

The records passed to ``on_record`` and returned are the cells' own records (unsealed).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import jax
from absl import logging

from deis_jax.experiments.engine import Cell, Progress, Record, run_cells
from deis_jax.io_utils import atomic_write_bytes, move_aside

FAILED = "failed"  # the record entry that marks a cell as failed: its reason
SHOWN = 5  # sample indices named in a failure's reason


def nonfinite_reason(indices: Sequence[int], total: int, count: int | None = None) -> str:
    """The reason of a cell whose samples ``indices`` (of ``total``; ``count`` of them when
    ``indices`` are only the first few) are not finite: ``"3 of 64 samples non-finite (e.g.
    #0, #5, #17)"``."""
    count = len(indices) if count is None else count
    shown = ", ".join(f"#{int(i)}" for i in list(indices)[:SHOWN])
    return f"{count} of {total} samples non-finite (e.g. {shown})"


def seal(key: str, fingerprint: str, result: Record) -> str:
    """The sha256 of ``json.dumps([key, fingerprint, result], sort_keys=True)`` (the same for
    ``result`` and its JSON round trip: string keys, JSON values)."""
    text = json.dumps([key, fingerprint, result], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _line_problem(
    line: dict, fingerprint: str, verify: Callable[[Record], str | None] | None
) -> str | None:
    """Why a cache line of this experiment cannot be trusted (None: it can)."""
    record = line.get("record")
    if not (isinstance(record, dict) and {"result", "sha256"} <= set(record)):
        return "it has no checksum (written by an older deis_jax)"
    result = record["result"]
    if not isinstance(result, dict) or record["sha256"] != seal(line["key"], fingerprint, result):
        return "its content does not match its checksum (damaged)"
    return None if verify is None else verify(result)


def _parse(raw: bytes) -> dict | None:
    """A cache line as a dict with a string ``key``, or None (torn, garbled, not a cell)."""
    try:
        line = json.loads(raw)
    except ValueError:  # a JSON or UTF-8 error
        return None
    return line if isinstance(line, dict) and isinstance(line.get("key"), str) else None


def scrub_cache(
    cache_path: str, fingerprint: str, verify: Callable[[Record], str | None] | None = None
) -> list[str]:
    """Check every line of ``cache_path`` of this experiment (see the module docstring).
    Lines of failed cells are dropped (their cells run again); if any line cannot be trusted
    the file is moved aside to ``<cache_path>.damaged-<UTC time>`` (kept for inspection) and
    the cache is rewritten, atomically, with the trusted lines only. Returns the damage found,
    one line each, naming the file, the line number and the cell (empty: nothing damaged)."""
    if not os.path.exists(cache_path):
        return []
    with open(cache_path, "rb") as f:
        lines = [raw for raw in f.read().split(b"\n") if raw.strip()]
    kept, damage, failed = [], [], []
    for number, raw in enumerate(lines, 1):
        line = _parse(raw)
        if line is None:
            damage.append(
                f"{cache_path} line {number}: not a cell record (torn or garbled); dropped"
            )
            continue
        problem = None
        if line.get("fingerprint") == fingerprint:
            problem = _line_problem(line, fingerprint, verify)
        if problem is not None:
            damage.append(f"{cache_path} line {number} (cell {line['key']}): {problem}; "
                          f"computing the cell again")  # fmt: skip
        elif line.get("fingerprint") == fingerprint and line["record"]["result"].get(FAILED):
            failed.append(f"cell {line['key']} failed ({line['record']['result'][FAILED]})")
        else:
            kept.append(raw)
    if not (damage or failed):
        return []
    moved = move_aside(cache_path, "damaged") if damage else None
    atomic_write_bytes(cache_path, b"".join(raw + b"\n" for raw in kept))
    for problem in damage:
        logging.warning("%s (the file as it was is kept as %s)", problem, moved)
    for problem in failed:
        logging.info("%s in an earlier run; computing it again", problem)
    return damage


def run_sealed_cells(
    cells: Sequence[Cell],
    compute: Callable[[Cell, Progress], Record],
    *,
    cache_path: str,
    fingerprint: str,
    verify: Callable[[Record], str | None] | None = None,
    on_record: Callable[[dict[str, Record]], None] | None = None,
    **kwargs,
) -> dict[str, Record]:
    """:func:`~deis_jax.experiments.engine.run_cells` with sealed, checked cache lines (see
    the module docstring); ``verify(result)`` returns why a cached result cannot be reused
    (None: it can). Other keywords go to ``run_cells``."""
    if jax.process_index() == 0:
        scrub_cache(cache_path, fingerprint, verify)

    def sealed(cell: Cell, advance: Progress) -> Record:
        result = compute(cell, advance)
        return {"result": result, "sha256": seal(cell.key, fingerprint, result)}

    def unsealed(records: dict[str, Record]) -> dict[str, Record]:
        return {k: v["result"] for k, v in records.items()}

    report = None if on_record is None else (lambda records: on_record(unsealed(records)))
    done = run_cells(cells, sealed, cache_path=cache_path, fingerprint=fingerprint,
                     on_record=report, **kwargs)  # fmt: skip
    return unsealed(done)
