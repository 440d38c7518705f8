"""Smoke test of scripts/benchmark_amed.py: its ``--quick`` run writes both tables."""

import csv
import importlib.util
import math
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "benchmark_amed.py"
RATIOS = ("base_over_bare", "predictor_over_base", "predictor_over_bare")


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_amed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_writes_tables(tmp_path):
    script = _load_script()
    out = tmp_path / "benchmark_amed"
    script.main(["--quick", "--out", str(out)])
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["network"], r["predictor"]) for r in rows} == {
        ("ddpmpp", "stepwise"),
        ("ddpmpp", "bottleneck"),
        ("mlp", "stepwise"),
    }
    for row in rows:
        assert row["batch"] == "8" and row["method"] == "amed_ipndm" and row["nfe"] == "5"
        assert all(math.isfinite(float(row[k])) and float(row[k]) > 0 for k in RATIOS)
        assert int(row["predictor_params"]) > 0
    bottleneck = next(r for r in rows if r["predictor"] == "bottleneck")
    assert int(bottleneck["num_features"]) == 64  # the 8x8 bottleneck of the digits network
    assert math.isfinite(float(bottleneck["features_over_eps"]))
    text = pathlib.Path(f"{out}.md").read_text()
    assert "# AMED predictor overhead" in text and "eps_features_call_ms" in text
