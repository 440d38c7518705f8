"""Smoke test of scripts/benchmark.py at toy size: one row per method and NFE, the budget rule
of its Runge-Kutta rows, and the targets attached to the multistep rows only."""

import csv
import importlib.util
import math
import pathlib

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "benchmark.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_run_writes_one_row_per_method_and_nfe(tmp_path):
    out = tmp_path / "benchmark"
    _load_script().main(["--dim", "8", "--hidden", "16", "--batch", "4", "--nfe", "3",
                         "--repeats", "1", "--eps", "mlp", "--methods", "tab3",
                         "rhork:tableau=rk4", "sddim", "--out", str(out)])  # fmt: skip
    with open(f"{out}.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["rhork:tableau=rk4", "sddim", "tab3"]
    # Runge-Kutta rounds the budget up to whole 4-call steps; the others spend it exactly
    assert {m: int(r["nfe"]) for m, r in rows.items()} == {
        "tab3": 3, "rhork:tableau=rk4": 4, "sddim": 3}  # fmt: skip
    for row in rows.values():
        for key in ("samples_per_s", "ratio", "compile_s_nfe10", "compile_s_nfe100"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, (row["method"], key)
    assert rows["tab3"]["target_ratio"] == "1.05"  # multistep, MLP eps
    assert rows["sddim"]["target_ratio"] == "" == rows["rhork:tableau=rk4"]["target_ratio"]
    text = pathlib.Path(f"{out}.md").read_text()
    assert "# Sampler benchmark" in text and "--methods tab3 rhork:tableau=rk4 sddim" in text
