"""``--mode=sweep``: grid expansion, validation, results + summary, resume after a kill
(``deis_jax.experiments.sweep`` on its ``cells``)."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from damage import Killed, csv_rows, flip_digit, truncate

from deis_jax.common.checks import ConfigError
from deis_jax.common.parallel import simulated_device_flags
from deis_jax.experiments import gmm
from deis_jax.experiments import sweep as sweep_mode
from deis_jax.experiments.engine import FAILED
from deis_jax.experiments.sweep import cells as sweep
from deis_jax.sampling.solvers.registry import MAX_NFE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_FILE = os.path.join(ROOT, "configs", "sweeps", "gmm_methods.py")
TOO_MANY = f"must be <= {MAX_NFE}, got 20000"

# Tiny versions of the example sweep: 1 dimension, few samples, a short reference solve.
TINY = {"data.dims": (2,), "compare.num_samples": 32, "compare.reference_steps": 10}


def tiny_config(axes):
    config = sweep.load_config_file(SWEEP_FILE)
    config.compare.x64 = False
    for path, value in TINY.items():
        section, field = path.split(".")
        config[section][field] = value
    config.sweep.axes = axes
    return config


AXES = (("sampler.spec", ("ddim", "tab2")), ("sampler.nfe", (3, 4)))


def test_expand_axes_product_and_zip():
    points = sweep.expand_axes(
        (
            ("sampler.nfe", (5, 10)),
            (("sampler.grid", "sampler.t0"), (("quadratic", 1e-3), ("log_snr", 1e-4))),
        )
    )
    assert len(points) == 4
    assert points[1] == {"sampler.nfe": 5, "sampler.grid": "log_snr", "sampler.t0": 1e-4}


def test_validation_names_point_and_field():
    with pytest.raises(ConfigError, match="sampler.nfee"):
        sweep_mode.validate(tiny_config((("sampler.nfee", (3,)),)))
    with pytest.raises(ConfigError, match=r'sweep point \{"sampler.nfe": 0\}.*sampler.nfe'):
        sweep_mode.validate(tiny_config((("sampler.nfe", (3, 0)),)))
    with pytest.raises(ConfigError, match="method spec"):
        sweep_mode.validate(tiny_config((("sampler.spec", ("tab3", "nosuch!")),)))
    with pytest.raises(ConfigError, match="zipped axis"):
        sweep_mode.validate(tiny_config(((("sampler.grid", "sampler.t0"), ("quadratic",)),)))
    points = sweep_mode.validate(tiny_config(AXES)).points
    assert [p.sampler.method for _, p in points] == ["ddim", "ddim", "tab", "tab"]
    assert [p.sampler.order for _, p in points] == [0, 0, 2, 2]


def test_sweep_resumes_after_a_kill(tmp_path, keep_x64):
    config = tiny_config(AXES)
    _, evaluate = sweep.EVALUATORS["gmm"]
    calls = []

    def flaky(point_config, context):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the third point
        calls.append((point_config.sampler.method, point_config.sampler.nfe))
        return evaluate(point_config, context)

    sweep.register_evaluator("flaky", gmm.validate_problem, flaky)
    try:
        config.sweep.evaluator = "flaky"
        with pytest.raises(KeyboardInterrupt):
            sweep_mode.run(config, str(tmp_path), progress=False)
        results = tmp_path / sweep.RESULTS_FILE
        assert len(results.read_text().splitlines()) == 2
        with open(results, "a") as f:
            f.write('{"key": "cut short by the kil')  # a torn last line is ignored

        calls.clear()
        counted = []

        def counting(point_config, context):
            counted.append((point_config.sampler.method, point_config.sampler.nfe))
            return evaluate(point_config, context)

        sweep.register_evaluator("flaky", gmm.validate_problem, counting)
        rows = sweep_mode.run(config, str(tmp_path), progress=False)
    finally:
        sweep.EVALUATORS.pop("flaky", None)
    assert counted == [("tab", 3), ("tab", 4)]  # only the two unfinished points
    assert len(rows) == 4
    # the torn line was dropped from the cache (the file as it was is kept aside)
    (aside,) = [p for p in os.listdir(tmp_path) if p.startswith(sweep.RESULTS_FILE + ".damaged-")]
    assert (tmp_path / aside).read_text().endswith('"cut short by the kil')
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert sorted(json.loads(x["key"])["sampler.spec"] for x in lines) == [
        "ddim", "ddim", "tab2", "tab2",
    ]  # fmt: skip
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["sampler.spec"], r["sampler.nfe"]) for r in table] == [
        ("ddim", "3"), ("ddim", "4"), ("tab2", "3"), ("tab2", "4"),
    ]  # fmt: skip
    assert all(float(r["rmse"]) > 0 for r in table)
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert "| rmse (dim 2) \\ sampler.nfe | 3 | 4 |" in (tmp_path / "sweep.md").read_text()


def test_main_runs_the_example_sweep_file(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = simulated_device_flags(os.environ.get("XLA_FLAGS"), None)
    args = [
        sys.executable, "main.py", f"--config={SWEEP_FILE}", f"--workdir={tmp_path}",
        "--config.data.dims=(2,)", "--config.compare.num_samples=16",
        "--config.compare.reference_steps=10", "--config.compare.x64=False",
        "--config.sweep.axes=(('sampler.spec', ('tab3', 'sddim')), ('sampler.nfe', (4,)))",
    ]  # fmt: skip
    for _ in range(2):  # the second run finds every point done
        out = subprocess.run(
            args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert out.returncode == 0, out.stderr[-4000:]
    lines = (tmp_path / sweep.RESULTS_FILE).read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(x)["record"]["result"]["records"][0] for x in lines]
    assert records[0]["rmse"] > 0 and records[1]["rmse"] is None  # sddim is stochastic
    assert all(r["nll_gap"] is not None and r["nfe"] == 4 for r in records)
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (tmp_path / name).exists()


def test_sweep_stochastic_nan_point_reads_failed(tmp_path, nan_eps_above, keep_x64):
    """sddim has no RMSE; a point whose samples are NaN must still be a failure, not an empty
    cell (before, its record had no non-finite number and passed as a result)."""
    nan_eps_above(0.9)  # the point with t1 = 1.0 fails, the one with t1 = 0.8 does not
    config = sweep.load_config_file(os.path.join(ROOT, "configs", "sweeps", "gmm_methods.py"))
    config.data.dims = (2,)
    config.compare.update(num_samples=8, reference_steps=10, x64=False)
    config.sampler.nfe = 3
    config.sweep.axes = (("sampler.spec", ("sddim",)), ("sampler.t1", (0.8, 1.0)))
    config.sweep.x = "sampler.t1"
    rows = sweep_mode.run(config, str(tmp_path), progress=False)
    by_t1 = {r["sampler.t1"]: r for r in rows}
    assert by_t1[1.0]["failed"].startswith("8 of 8 samples non-finite")
    assert by_t1[1.0]["nll_gap"] is None and by_t1[0.8]["nll_gap"] is not None
    assert "failed" not in by_t1[0.8]
    table = (tmp_path / "sweep.md").read_text()
    nll = table.split("## nll_gap, dim 2")[1]
    assert nll.splitlines()[4].startswith("| sddim |") and "| failed |" in nll, nll
    csv_rows = {r["sampler.t1"]: r for r in csv.DictReader(open(tmp_path / "sweep.csv"))}
    assert csv_rows["1.0"]["failed"].startswith("8 of 8") and csv_rows["1.0"]["nll_gap"] == ""
    assert csv_rows["0.8"]["failed"] == "" and float(csv_rows["0.8"]["nll_gap"]) == pytest.approx(
        by_t1[0.8]["nll_gap"]
    )


def test_sweep_nfe_axis_checked_by_the_methods_rule():
    config = sweep.load_config_file(os.path.join(ROOT, "configs", "sweeps", "gmm_methods.py"))
    config.sweep.axes = (("sampler.spec", ("ddim",)), ("sampler.nfe", (3, 20000)))
    point = '{"sampler.nfe": 20000, "sampler.spec": "ddim"}'
    with pytest.raises(ConfigError) as err:
        sweep_mode.validate(config)
    assert str(err.value).startswith(f"sweep point {point}: config.sampler.nfe {TOO_MANY}")


# --- killed, failed, damaged and swapped runs ----------------------------------------------


def sweep_config(evaluator):
    config = sweep.load_config_file(os.path.join(ROOT, "configs", "sweeps", "gmm_methods.py"))
    config.data.dims = (2,)
    config.sweep.axes = (("sampler.spec", ("ddim", "tab2")), ("sampler.nfe", (3, 4)))
    config.sweep.evaluator = evaluator
    return config


@pytest.fixture
def evaluator():
    """A registered sweep evaluator ``"fake"`` (no sampling: the sweep's files are the point)
    whose records list their fields out of order; ``calls`` records the points evaluated,
    ``mode["nan"]`` makes tAB2 at NFE 4 non-finite, ``mode["kill_at"]`` kills a point."""
    calls, mode = [], {"nan": False, "kill_at": None}

    def evaluate(config, context):
        point = (config.sampler.method, config.sampler.nfe)
        if point == mode["kill_at"]:
            raise Killed
        calls.append(point)
        rmse = 1.0 / (config.sampler.nfe + config.sampler.order)
        if mode["nan"] and point == ("tab", 4):
            rmse = float("nan")
        return [{"seconds": 0.5, "rmse": rmse, "nfe": config.sampler.nfe, "dim": 2,
                 "zeta": "z", "nll_gap": 2 * rmse}]  # fmt: skip

    sweep.register_evaluator("fake", gmm.validate_problem, evaluate)
    yield calls, mode
    sweep.EVALUATORS.pop("fake", None)


def test_sweep_kill_nan_damage_swap_and_csv_columns(tmp_path, evaluator, caplog):
    calls, mode = evaluator
    workdir, config = str(tmp_path), sweep_config("fake")
    mode.update(kill_at=("tab", 3))
    with pytest.raises(Killed):
        sweep_mode.run(config, workdir, progress=False)
    mode.update(kill_at=None, nan=True)
    rows = sweep_mode.run(config, workdir, progress=False)
    assert calls == [("ddim", 3), ("ddim", 4), ("tab", 3), ("tab", 4)]
    assert rows[3][FAILED] == "dim 2: non-finite rmse, nll_gap" and rows[3]["rmse"] is None
    assert "| tab2 | 0.2 | failed |" in open(os.path.join(workdir, "sweep.md")).read()
    header = open(os.path.join(workdir, "sweep.csv")).readline().strip()
    assert header == "sampler.spec,sampler.nfe,dim,nfe,rmse,nll_gap,failed,seconds,zeta"

    mode.update(nan=False)
    calls.clear()
    rows = sweep_mode.run(config, workdir, progress=False)
    assert calls == [("tab", 4)]  # the failed point, nothing else
    resumed_csv = csv_rows(os.path.join(workdir, "sweep.csv"))
    # cached records read back with sorted keys: the columns must not follow them
    assert open(os.path.join(workdir, "sweep.csv")).readline().strip() == (
        "sampler.spec,sampler.nfe,dim,nfe,rmse,nll_gap,seconds,zeta"
    )

    cache = os.path.join(workdir, sweep.RESULTS_FILE)
    flip_digit(cache, "rmse", line=0)
    os.remove(os.path.join(workdir, "sweep.csv"))
    truncate(os.path.join(workdir, "sweep.md"))
    calls.clear()
    with caplog.at_level(logging.WARNING):
        sweep_mode.run(config, workdir, progress=False)
    assert calls == [("ddim", 3)] and f"{cache} line 1" in caplog.text
    assert csv_rows(os.path.join(workdir, "sweep.csv")) == resumed_csv
    assert (
        "| rmse (dim 2) \\ sampler.nfe | 3 | 4 |" in open(os.path.join(workdir, "sweep.md")).read()
    )

    other = str(tmp_path / "other")  # another sweep's finished cache swapped in
    config_b = sweep_config("fake")
    config_b.seed = 7
    sweep_mode.run(config_b, other, progress=False)
    shutil.copy(os.path.join(other, sweep.RESULTS_FILE), cache)
    calls.clear()
    sweep_mode.run(config, workdir, progress=False)
    assert len(calls) == 4  # nothing of the other sweep used
    assert csv_rows(os.path.join(workdir, "sweep.csv")) == resumed_csv
