"""The experiment engine: resume after a kill, fingerprint identity, unique keys, progress."""

from __future__ import annotations

import json

import pytest

from deis_jax.common.identity import fingerprint
from deis_jax.experiments.engine import Cell, read_cache, run_cells

CELLS = [Cell(f"c{i}", cost=10.0 * (i + 1), label=f"cell {i}", payload=i) for i in range(4)]


class Killed(Exception):
    pass


def squares(calls, kill_at=None):
    def compute(cell, advance):
        if cell.payload == kill_at:
            raise Killed
        calls.append(cell.key)
        return {"value": cell.payload**2}

    return compute


def test_fingerprint_is_stable_and_order_free():
    assert fingerprint({"a": 1, "b": [2, 3]}) == fingerprint({"b": [2, 3], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint({"a": 1})) == 16


def test_resume_after_a_kill_with_a_torn_last_line(tmp_path):
    path = str(tmp_path / "cells.jsonl")
    calls = []
    with pytest.raises(Killed):  # killed while computing the third cell
        run_cells(CELLS, squares(calls, kill_at=2), cache_path=path, fingerprint="f",
                  desc="t", progress=False)  # fmt: skip
    assert calls == ["c0", "c1"]
    with open(path, "a") as f:
        f.write('{"key": "c2", "fingerprint": "f", "rec')  # a write cut short by the kill
    assert read_cache(path, "f") == {"c0": {"value": 0}, "c1": {"value": 1}}
    assert len(open(path).read().splitlines()) == 3

    calls.clear()
    records = run_cells(CELLS, squares(calls), cache_path=path, fingerprint="f", desc="t",
                        progress=False)  # fmt: skip
    assert calls == ["c2", "c3"]  # only the unfinished cells
    assert records == {f"c{i}": {"value": i * i} for i in range(4)}
    assert list(records) == [c.key for c in CELLS]  # cell order, cached or new
    lines = open(path).read().splitlines()  # the torn line dropped (the file kept aside)
    assert [json.loads(x)["key"] for x in lines] == ["c0", "c1", "c2", "c3"]
    assert len(list(tmp_path.glob("cells.jsonl.damaged-*"))) == 1

    calls.clear()
    again = run_cells(CELLS, squares(calls), cache_path=path, fingerprint="f", desc="t",
                      progress=False)  # fmt: skip
    assert calls == [] and again == records
    assert open(path).read().splitlines() == lines  # a finished cell is never appended again


def test_a_new_fingerprint_recomputes_every_cell(tmp_path):
    path = str(tmp_path / "cells.jsonl")
    run_cells(CELLS, squares([]), cache_path=path, fingerprint="old", desc="t", progress=False)
    calls = []
    run_cells(CELLS, squares(calls), cache_path=path, fingerprint="new", desc="t", progress=False)
    assert calls == [c.key for c in CELLS]
    assert set(read_cache(path, "old")) == set(read_cache(path, "new")) == {c.key for c in CELLS}


def test_duplicate_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run_cells([Cell("a"), Cell("b"), Cell("a")], squares([]),
                  cache_path=str(tmp_path / "x.jsonl"), fingerprint="f", desc="t")  # fmt: skip
    assert not (tmp_path / "x.jsonl").exists()


def test_progress_callback_and_on_record(tmp_path, monkeypatch):
    from deis_jax.experiments import engine

    moves = []

    class Bar:  # records what the engine does to its progress bar
        def __init__(self, total, desc, unit, disable):
            self.total = total
            moves.append(("total", total))

        def update(self, amount):
            moves.append(("update", amount))

        def set_postfix_str(self, text):
            moves.append(("label", text))

        def close(self):
            pass

    monkeypatch.setattr(engine, "progress_bar", Bar)
    path = str(tmp_path / "cells.jsonl")
    run_cells(CELLS[:1], squares([]), cache_path=path, fingerprint="f", desc="t")

    def halves(cell, advance):
        advance(cell.cost / 2)  # the rest is added when the cell returns
        return {"value": cell.payload}

    seen = []
    moves.clear()
    run_cells(CELLS[:3], halves, cache_path=path, fingerprint="f", desc="t",
              on_record=lambda records: seen.append(list(records)))  # fmt: skip
    # The bar covers only the pending cells (c1, c2), in units of their cost.
    assert moves == [
        ("total", 20.0 + 30.0),
        ("label", "cell 1"), ("update", 10.0), ("update", 10.0),
        ("label", "cell 2"), ("update", 15.0), ("update", 15.0),
    ]  # fmt: skip
    assert seen == [["c0", "c1"], ["c0", "c1", "c2"]]  # after each new cell, cached ones too
