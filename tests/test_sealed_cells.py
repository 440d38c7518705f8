"""The sealed cell cache (``experiments.engine.run_cells``, what compare, sweep,
table and fit cache their cells in): killed and damaged caches are repaired, failed cells are
reported and never reused, cells whose artifact fails verification are recomputed."""

from __future__ import annotations

import json
import logging
import os

import pytest
from damage import Killed, damaged_copies, flip_bit, flip_digit

from deis_jax.experiments.engine import FAILED, Cell, run_cells

CELLS = [Cell(f"c{i}", payload=i) for i in range(4)]


EXPECTED = {f"c{i}": {"value": i / 7, "label": f"cell {i}"} for i in range(4)}


def cell_run(path, calls, kill_at=None, fingerprint="f", **kwargs):
    def compute(cell, advance):
        if cell.payload == kill_at:
            raise Killed
        calls.append(cell.key)
        return {"value": cell.payload / 7, "label": f"cell {cell.payload}"}

    return run_cells(CELLS, compute, cache_path=path, fingerprint=fingerprint,
                            desc="t", progress=False, **kwargs)  # fmt: skip


def _torn(path):  # a kill while the third line was written
    data = open(path, "rb").read()
    start = sum(len(x) + 1 for x in data.split(b"\n")[:2])
    open(path, "wb").write(data[: start + 30])


def _unsealed(path):  # a line written before records were sealed
    lines = open(path).read().splitlines()
    line = json.loads(lines[2])
    line["record"] = line["record"]["result"]
    lines[2] = json.dumps(line, sort_keys=True)
    open(path, "w").write("\n".join(lines) + "\n")


def _foreign(path):  # the cache of another experiment (another fingerprint)
    os.remove(path)
    cell_run(path, [], fingerprint="another experiment")


CACHE_DAMAGE = {
    # name: (damage, cells computed again, log names line 3)
    "torn": (_torn, ["c2", "c3"], True),
    "value_bit": (lambda p: flip_digit(p, "value", line=2), ["c2"], True),
    "key_bit": (lambda p: flip_bit(p, open(p, "rb").read().index(b'"c2"') + 2), ["c2"], True),
    "unsealed": (_unsealed, ["c2"], True),
    "deleted": (os.remove, ["c0", "c1", "c2", "c3"], False),
    "foreign": (_foreign, ["c0", "c1", "c2", "c3"], False),
}


@pytest.mark.parametrize("name", list(CACHE_DAMAGE))
def test_cell_cache_kill_and_damage(tmp_path, caplog, name):
    path = str(tmp_path / "cells.jsonl")
    calls = []
    with pytest.raises(Killed):
        cell_run(path, calls, kill_at=3)
    assert calls == ["c0", "c1", "c2"]
    damage, recomputed, named = CACHE_DAMAGE[name]
    damage(path)
    calls.clear()
    with caplog.at_level(logging.WARNING):
        records = cell_run(path, calls)
    assert records == EXPECTED  # as an uninterrupted run
    assert calls == recomputed + (["c3"] if "c3" not in recomputed else [])
    if named:
        assert f"{path} line 3" in caplog.text and damaged_copies(path)
    calls.clear()
    assert cell_run(path, calls) == EXPECTED and calls == []  # the repaired cache is complete


def test_failed_cells_are_reported_but_never_reused(tmp_path):
    path = str(tmp_path / "cells.jsonl")

    def compute(cell, advance):
        calls.append(cell.key)
        if cell.key == "c1" and first_run:
            return {"value": None, FAILED: "3 of 8 samples non-finite (e.g. #0, #2, #5)"}
        return {"value": cell.payload}

    calls, first_run = [], True
    first = run_cells(CELLS, compute, cache_path=path, fingerprint="f", desc="t",
                             progress=False)  # fmt: skip
    assert first["c1"][FAILED].startswith("3 of 8 samples non-finite")
    calls.clear()
    first_run = False
    second = run_cells(CELLS, compute, cache_path=path, fingerprint="f", desc="t",
                              progress=False)  # fmt: skip
    assert calls == ["c1"] and second["c1"] == {"value": 1}  # retried, not reused


def test_cached_cells_whose_artifact_fails_verification_are_recomputed(tmp_path, caplog):
    path, calls = str(tmp_path / "cells.jsonl"), []
    cell_run(path, calls)
    calls.clear()
    with caplog.at_level(logging.WARNING):
        records = cell_run(
            path, calls, verify=lambda r: "its file is gone" * (r["value"] > 0.4) or None
        )
    assert calls == ["c3"] and records == EXPECTED
    assert "line 4 (cell c3): its file is gone" in caplog.text
