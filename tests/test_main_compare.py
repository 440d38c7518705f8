"""The embedded main job (``--mode=compare``) end to end, in process, and resuming a finished
run without recomputing; failed cells shown as failed; a killed, NaN-poisoned or damaged run
and a full disk end as an uninterrupted run would. (``main.py`` itself, a subprocess, is tested in
``test_config_validation.py``: a bad value is a usage error before any work.)"""

import csv
import dataclasses
import logging
import os
import sys

import jax.numpy as jnp
import pytest
from damage import FullDisk, Killed, check_message, flip_digit, truncate, without

from deis_jax.common.checks import ConfigError
from deis_jax.common.files import DiskFullError
from deis_jax.experiments import compare, gmm
from deis_jax.experiments.engine import FAILED
from deis_jax.experiments.modes import run_mode
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


# --- killed, failed and damaged runs -------------------------------------------------------


def tiny_compare_config():
    config = gmm_vpsde.get_config()
    config.data.dims = (3,)  # no 2-D scatter plot (it recomputes cached cells)
    config.compare.update(nfes=(3,), methods=("ddim",), num_samples=16, reference_steps=10,
                          scatter_nfe=3)  # fmt: skip
    return config


def test_compare_kill_nan_damage_and_restart(tmp_path, monkeypatch, caplog):
    workdir, calls = str(tmp_path), []
    run_cell = gmm.run_cell

    def patched(mode):
        def cell(problem, sampler, mesh):
            if mode == "kill":
                raise Killed
            calls.append(sampler.method)
            if mode == "nan":  # the network's output is NaN: the samples too
                eps = sampler.eps_fn
                sampler = dataclasses.replace(sampler, eps_fn=lambda x, t: eps(x, t) * jnp.nan)
            return run_cell(problem, sampler, mesh)

        monkeypatch.setattr(gmm, "run_cell", cell)

    patched("kill")
    with pytest.raises(Killed):  # after the reference cell, before the ddim cell
        compare.run(tiny_compare_config(), workdir)
    patched("nan")
    records = compare.run(tiny_compare_config(), workdir)
    ddim = records[1]
    assert ddim[FAILED] == "16 of 16 samples non-finite (e.g. #0, #1, #2, #3, #4)"
    assert ddim["rmse"] is None and ddim["nll_gap"] is None
    patched("ok")
    resumed = compare.run(tiny_compare_config(), workdir)
    assert calls == ["ddim", "ddim"]  # the failed cell computed again, the reference not
    assert FAILED not in resumed[1] and resumed[1]["rmse"] > 0

    cache = os.path.join(workdir, "results.jsonl")
    flip_digit(cache, "rmse", line=1)
    truncate(os.path.join(workdir, "results.md"))
    os.remove(os.path.join(workdir, "results.csv"))
    calls.clear()
    with caplog.at_level(logging.WARNING):
        repaired = compare.run(tiny_compare_config(), workdir)
    assert f"{cache} line 2 (cell 3|ddim|3): its content does not match its checksum" in caplog.text
    assert calls == ["ddim"] and without(repaired, "seconds") == without(resumed, "seconds")
    assert "## dim 3: RMSE vs reference" in open(os.path.join(workdir, "results.md")).read()

    os.remove(cache)  # the cache deleted: everything computed again, as an uninterrupted run
    calls.clear()
    fresh = compare.run(tiny_compare_config(), workdir)
    assert calls == ["ddim"] and without(fresh, "seconds") == without(resumed, "seconds")


def test_compare_stops_in_one_line_and_resumes(tmp_path, monkeypatch):
    workdir, calls, run_cell = str(tmp_path), [], gmm.run_cell

    def counted(problem, sampler, mesh):
        calls.append(sampler.method)
        return run_cell(problem, sampler, mesh)

    monkeypatch.setattr(gmm, "run_cell", counted)
    cache = os.path.join(workdir, "results.jsonl")
    disk = FullDisk(monkeypatch, lambda path: path == cache, after=1)  # at the ddim cell
    with pytest.raises(DiskFullError) as info:
        compare.run(tiny_compare_config(), workdir)
    check_message(info.value, cache)
    assert calls == ["ddim"]

    disk.free()
    calls.clear()
    resumed = compare.run(tiny_compare_config(), workdir)
    assert calls == ["ddim"]  # the torn ddim line is computed again, the reference is not
    os.remove(cache)
    fresh = compare.run(tiny_compare_config(), workdir)  # an uninterrupted run
    assert without(resumed, "seconds") == without(fresh, "seconds")
