"""The embedded main job end to end, and resuming a finished run without recomputing."""

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--config.data.dims=(2,16)",
    "--config.compare.nfes=(3,5)",
    "--config.compare.methods=('ddim','tab3','rhork2')",
    "--config.compare.num_samples=64",
    "--config.compare.reference_steps=20",
    "--config.compare.scatter_nfe=5",
]


def run_main(workdir):
    command = [sys.executable, "main.py", "--config=configs/gmm_vpsde.py", f"--workdir={workdir}"]
    return subprocess.run(command + SMALL, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_compare_end_to_end_and_resume(tmp_path):
    first = run_main(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("results.csv", "results.md", "error_vs_nfe.png", "samples_2d.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 2 * (3 * 2 + 1)  # dims x (methods x nfes + reference)
    spent = {(r["dim"], r["method"], r["nfe_budget"]): int(r["nfe"]) for r in rows}
    assert spent[("2", "rhork2", "3")] == 4 and spent[("2", "tab3", "5")] == 5
    errors = {(r["dim"], r["method"], r["nfe_budget"]): float(r["rmse"]) for r in rows
              if r["method"] != "reference"}  # fmt: skip
    for dim in ("2", "16"):
        assert errors[(dim, "tab3", "5")] < errors[(dim, "ddim", "5")]
    table = (tmp_path / "results.md").read_text()
    assert "## dim 16: RMSE vs reference" in table and "⁺1" in table

    cache = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(cache) == 2 * 3 * 2
    second = run_main(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    # Only the scatter cells (dim 2 at scatter_nfe) are re-run, and nothing is appended.
    assert (tmp_path / "results.jsonl").read_text().splitlines() == cache
    rows2 = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["rmse"] for r in rows2] == [r["rmse"] for r in rows]
