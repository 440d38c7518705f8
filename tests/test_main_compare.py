"""The embedded main job (``--mode=compare``) end to end, in process, and resuming a finished
run without recomputing. (``main.py`` itself, a subprocess, is tested in
``test_config_validation.py``: a bad value is a usage error before any work.)"""

import csv
import os
import sys

import pytest

from deis_jax.config_validation import ConfigError
from deis_jax.evaluation import gmm
from deis_jax.modes import compare, run_mode
from deis_jax.sampling.solvers.registry import MAX_NFE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import gmm_vpsde  # noqa: E402

TOO_MANY = f"must be <= {MAX_NFE}, got 20000"

SMALL = {
    "data.dims": (2, 16),
    "compare.nfes": (3, 5),
    "compare.methods": ("ddim", "tab3", "rhork2"),
    "compare.num_samples": 64,
    "compare.reference_steps": 20,
    "compare.scatter_nfe": 5,
}


def small_config():
    config = gmm_vpsde.get_config()
    for path, value in SMALL.items():
        section, field = path.split(".")
        config[section][field] = value
    return config


def test_compare_end_to_end_and_resume(tmp_path):
    run_mode("compare", small_config(), str(tmp_path))
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
    assert len(cache) == 2 * (3 * 2 + 1)  # every cell, the reference rows included
    os.remove(tmp_path / "samples_2d.png")
    run_mode("compare", small_config(), str(tmp_path))
    # Nothing is appended; the scatter plot is redrawn (its cached cells' 2-D samples are
    # recomputed) and the table is the same.
    assert (tmp_path / "results.jsonl").read_text().splitlines() == cache
    assert os.path.getsize(tmp_path / "samples_2d.png") > 0
    rows2 = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["rmse"] for r in rows2] == [r["rmse"] for r in rows]


def compare_config(**compare_fields):
    config = gmm_vpsde.get_config()
    config.data.dims = (2,)
    config.compare.update(methods=("ddim", "sddim"), nfes=(3,), num_samples=8,
                          reference_steps=10, scatter_nfe=3, x64=False)  # fmt: skip
    config.compare.update(compare_fields)
    return config


def test_compare_failed_cells_read_failed_in_md_and_csv(tmp_path, nan_eps_above):
    nan_eps_above(0.0)  # every eps call is NaN: both methods fail, the stochastic one too
    run_mode("compare", compare_config(), str(tmp_path))
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert list(rows["ddim"]) == list(gmm.CSV_FIELDS)
    for method in ("ddim", "sddim"):
        assert rows[method]["failed"].startswith("8 of 8 samples non-finite (e.g. #0, #1")
        assert rows[method]["rmse"] == rows[method]["nll_gap"] == ""
    assert rows["reference"]["failed"] == ""
    table = (tmp_path / "results.md").read_text()
    for title in ("RMSE vs reference", "NLL gap (nats/dim)"):
        section = table.split(f"## dim 2: {title}")[1].split("##")[0]
        assert "| ddim | failed |" in section and "| sddim | failed |" in section, section
    assert "nan" not in table.lower().replace("nats", "")


def test_compare_nfes_checked_by_the_methods_rule():
    with pytest.raises(ConfigError, match=f"config.compare.nfes entry 20000: {TOO_MANY}"):
        compare.validate(compare_config(nfes=(3, 20000)))
