"""The experiment engine: a grid of cells, each computed once, sealed, cached, resumed.

Every experiment mode (compare, sweep, table, fit) is a list of cells and a function that
computes one:

    cells = [Cell(key=f"{dim}|{label}|{nfe}", cost=nfe) for ...]
    records = run_cells(cells, compute, cache_path=".../results.jsonl",
                        fingerprint=fingerprint({"sde": ..., "data": ...}), desc="compare")

* **Identity.** A cell is identified by its ``key`` (unique within the experiment) and by the
  experiment's ``fingerprint``, the short id of every setting the cells' results depend on
  (``deis_jax.common.identity.fingerprint``). A cached record is reused only when both match.
* **Cache.** Each finished cell is appended to ``cache_path`` as one JSON line
  ``{"key", "fingerprint", "record": {"result": <the cell's record>, "sha256": <seal>}}``
  with a single fsync'ed write (``common.files.append_jsonl``); the seal is the
  ``json_digest`` of ``[key, fingerprint, result]``, so a bit flipped anywhere in the line no
  longer matches. A killed run loses at most the cell in flight and resumes where it stopped.
* **Checked on resume** (:func:`scrub_cache`). A line that is not a cell record (torn by a
  kill, garbled), or one of this experiment with no seal (written by an older deis_jax), a
  wrong seal, or a result that fails the caller's ``verify`` (e.g. a file it names is missing
  or changed) is damage: named in the log with its line number and cell key, the file is
  moved aside to ``<cache>.damaged-<UTC time>`` and rewritten without those lines, and their
  cells are computed again. Lines of other experiments (other fingerprints) are kept.
* **Failures are not results.** A cell whose record has a ``"failed"`` entry (the reason,
  e.g. :func:`nonfinite_reason`) is reported by the mode in this run, but never reused.
* **Progress.** One bar over the cells still to run, in units of ``Cell.cost``; ``compute``
  may advance it finer through the callback it receives.
* **Report.** ``on_record(records)`` runs after every newly finished cell (e.g. rewrite a
  table, so a long run shows partial results); the caller writes the final report from the
  returned records.
* **Several processes.** Every process runs every pending cell in the same order (SPMD: the
  cells may use collectives over a global mesh); process 0 alone checks and reads the cache
  (its decision is broadcast), writes it and calls ``on_record``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from deis_jax.common import parallel
from deis_jax.common.files import append_jsonl, atomic_write_bytes, move_aside, read_jsonl
from deis_jax.common.identity import json_digest
from deis_jax.common.progress import progress_bar

Record = dict[str, Any]
Progress = Callable[[float], None]
FAILED = "failed"  # the record entry that marks a cell as failed: its reason
SHOWN = 5  # sample indices named in a failure's reason


@dataclasses.dataclass(frozen=True)
class Cell:
    """One unit of an experiment. ``key`` identifies it in the cache; ``cost`` is its weight
    on the progress bar; ``label`` is what the bar shows while it runs; ``payload`` is
    whatever ``compute`` needs (not part of the identity: put what matters in the key or the
    fingerprint)."""

    key: str
    cost: float = 1  # an int default: a bar of whole cells counts "3/243", not "3.0/243.0"
    label: str = ""
    payload: Any = None


def nonfinite_reason(indices: Sequence[int], total: int, count: int | None = None) -> str:
    """The reason of a cell whose samples ``indices`` (of ``total``; ``count`` of them when
    ``indices`` are only the first few) are not finite: ``"3 of 64 samples non-finite (e.g.
    #0, #5, #17)"``."""
    count = len(indices) if count is None else count
    shown = ", ".join(f"#{int(i)}" for i in list(indices)[:SHOWN])
    return f"{count} of {total} samples non-finite (e.g. {shown})"


def seal(key: str, fingerprint: str, result: Record) -> str:
    """The seal of a cached result: ``json_digest([key, fingerprint, result])`` (the same
    for ``result`` and its JSON round trip: string keys, JSON values)."""
    return json_digest([key, fingerprint, result])


# --- the cache --------------------------------------------------------------------------------


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


def read_cache(cache_path: str, fingerprint: str) -> dict[str, Record]:
    """``{key: result}`` of the sealed cache lines written under ``fingerprint`` (other lines
    ignored; run :func:`scrub_cache` first to trust them)."""
    return {
        line["key"]: line["record"]["result"]
        for line in read_jsonl(cache_path)
        if line.get("fingerprint") == fingerprint
        and "key" in line
        and isinstance(line.get("record"), dict)
        and "result" in line["record"]
    }


# --- the runner -------------------------------------------------------------------------------


def run_cells(
    cells: Sequence[Cell],
    compute: Callable[[Cell, Progress], Record],
    *,
    cache_path: str,
    fingerprint: str,
    desc: str,
    unit: str = "cell",
    verify: Callable[[Record], str | None] | None = None,
    on_record: Callable[[dict[str, Record]], None] | None = None,
    progress: bool = True,
) -> dict[str, Record]:
    """Compute every cell not yet in the cache, in order (see the module docstring).

    ``compute(cell, advance)`` returns the cell's record (a JSON-able dict); it may call
    ``advance(amount)`` to move the progress bar, otherwise the bar moves by ``cell.cost``
    when it returns. ``verify(result)`` says why a cached result cannot be reused (None: it
    can). Returns ``{key: record}`` for every cell, cached or new, in cell order (process 0;
    the other processes get the records they computed).
    """
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError(f"cell keys must be unique, got duplicates in {keys}")
    is_main = jax.process_index() == 0
    if is_main:
        scrub_cache(cache_path, fingerprint, verify)
    cached = read_cache(cache_path, fingerprint) if is_main else {}
    finished = np.array([k in cached for k in keys], np.int32)
    finished = parallel.broadcast_from_process_0(finished).astype(bool)
    todo = [c for c, f in zip(cells, finished, strict=True) if not f]

    done = {c.key: cached[c.key] for c in cells if c.key in cached}
    bar = progress_bar(sum(c.cost for c in todo), desc, unit,
                       disable=not (progress and is_main and todo))  # fmt: skip
    for cell in todo:
        bar.set_postfix_str(cell.label or cell.key)
        moved = [0]

        def advance(amount: float, moved=moved) -> None:
            moved[0] += amount
            bar.update(amount)

        result = compute(cell, advance)
        if moved[0] < cell.cost:
            bar.update(cell.cost - moved[0])
        done[cell.key] = result
        if is_main:
            sealed = {"result": result, "sha256": seal(cell.key, fingerprint, result)}
            append_jsonl(cache_path, {"key": cell.key, "fingerprint": fingerprint,
                                      "record": sealed})  # fmt: skip
            if on_record is not None:
                on_record({k: done[k] for k in keys if k in done})
    bar.close()
    return {k: done[k] for k in keys if k in done}
