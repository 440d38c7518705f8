"""The experiment engine: a grid of cells, each computed once, cached atomically, resumed.

Every experiment mode (compare, sweep, table, and the fitting modes) is a list of cells and a
function that computes one:

    cells = [Cell(key=f"{dim}|{label}|{nfe}", cost=nfe) for ...]
    records = run_cells(cells, compute, cache_path=".../results.jsonl",
                        fingerprint=fingerprint({"sde": ..., "data": ...}), desc="compare")

* **Identity.** A cell is identified by its ``key`` (unique within the experiment) and by the
  experiment's ``fingerprint``, a hash of every setting the cells' results depend on
  (:func:`fingerprint`). A cached record is reused only when both match.
* **Cache.** Each finished cell is appended to ``cache_path`` as one JSON line
  ``{"key", "fingerprint", "record"}`` with a single fsync'ed write (``io_utils.append_jsonl``);
  a line cut short by a kill is ignored on reading, so a killed run loses at most the cell in
  flight and resumes where it stopped. A cell already in the cache is never appended again.
* **Progress.** One bar over the cells still to run, in units of ``Cell.cost`` (cells, NFE x
  samples, ...); ``compute`` may advance it finer through the callback it receives.
* **Report.** ``on_record(records)`` runs after every newly finished cell (e.g. rewrite a
  table, so a long run shows partial results); the caller writes the final report from the
  returned records.
* **Several processes.** Every process runs every pending cell in the same order (SPMD: the
  cells may use collectives over a global mesh); process 0 alone reads the cache (its decision
  is broadcast), writes it and calls ``on_record``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from deis_jax import parallel
from deis_jax.io_utils import append_jsonl, read_jsonl

Record = dict[str, Any]
Progress = Callable[[float], None]


def fingerprint(payload: Any) -> str:
    """Short stable hash of a JSON-able ``payload`` (keys sorted; other objects by ``str``):
    the one identity helper of every cached result (cells, sample runs);
    :func:`describe_differences` says which settings make two payloads differ."""
    return hashlib.sha1(_canonical(payload).encode()).hexdigest()[:16]


_HEX_DIGEST = re.compile(r"[0-9a-f]{32,}")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of nested dicts (lists and other values are leaves)."""
    if not isinstance(value, dict) or not value:
        return {prefix or "(root)": value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _canonical(value: Any) -> str:
    """The JSON text :func:`fingerprint` hashes for ``value``."""
    return json.dumps(value, sort_keys=True, default=str)


def _show(value: Any) -> str:
    """A short display of one setting: hex digests cut to 12 characters, long values to 60."""
    if isinstance(value, str) and _HEX_DIGEST.fullmatch(value):
        return value[:12] + "…"
    text = _canonical(value)
    return text if len(text) <= 60 else text[:59] + "…"


_ABSENT = object()


def describe_differences(on_disk: Any, this_run: Any) -> list[str]:
    """One line per setting that differs between two identity payloads (what
    :func:`fingerprint` hashes), named by its dotted path:
    ``"metadata.model.params_sha256: 3fa2c0d1e2f3… (on disk) vs 91bc04a5b6c7… (this run)"``.
    Empty when the payloads are equal."""
    old, new = _flatten(on_disk), _flatten(this_run)
    lines = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if _canonical(a) == _canonical(b):
            continue
        shown_a = "(absent)" if a is _ABSENT else _show(a)
        shown_b = "(absent)" if b is _ABSENT else _show(b)
        lines.append(f"{key}: {shown_a} (on disk) vs {shown_b} (this run)")
    return lines


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


def read_cache(cache_path: str, fingerprint_: str) -> dict[str, Record]:
    """``{key: record}`` of the cache lines written under ``fingerprint_`` (others ignored)."""
    return {
        line["key"]: line["record"]
        for line in read_jsonl(cache_path)
        if line.get("fingerprint") == fingerprint_ and "key" in line and "record" in line
    }


def run_cells(
    cells: Sequence[Cell],
    compute: Callable[[Cell, Progress], Record],
    *,
    cache_path: str,
    fingerprint: str,
    desc: str,
    unit: str = "cell",
    on_record: Callable[[dict[str, Record]], None] | None = None,
    progress: bool = True,
) -> dict[str, Record]:
    """Compute every cell not yet in the cache, in order (see the module docstring).

    ``compute(cell, advance)`` returns the cell's record (a JSON-able dict); it may call
    ``advance(amount)`` to move the progress bar, otherwise the bar moves by ``cell.cost``
    when it returns. Returns ``{key: record}`` for every cell, cached or new, in cell order
    (process 0; the other processes get the records they computed).
    """
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError(f"cell keys must be unique, got duplicates in {keys}")
    is_main = jax.process_index() == 0
    cached = read_cache(cache_path, fingerprint) if is_main else {}
    finished = np.array([k in cached for k in keys], np.int32)
    finished = parallel.broadcast_from_process_0(finished).astype(bool)
    todo = [c for c, f in zip(cells, finished, strict=True) if not f]

    done: dict[str, Record] = {}
    bar = tqdm(
        total=sum(c.cost for c in todo), desc=desc, unit=unit, unit_scale=unit != "cell",
        dynamic_ncols=True, disable=not (progress and is_main and todo),
    )  # fmt: skip
    for cell in cells:
        if cell.key in cached:
            done[cell.key] = cached[cell.key]
    for cell in todo:
        bar.set_postfix_str(cell.label or cell.key)
        moved = [0]

        def advance(amount: float, moved=moved) -> None:
            moved[0] += amount
            bar.update(amount)

        record = compute(cell, advance)
        if moved[0] < cell.cost:
            bar.update(cell.cost - moved[0])
        done[cell.key] = record
        if is_main:
            append_jsonl(
                cache_path, {"key": cell.key, "fingerprint": fingerprint, "record": record}
            )
            if on_record is not None:
                on_record({k: done[k] for k in keys if k in done})
    bar.close()
    return {k: done[k] for k in keys if k in done}
