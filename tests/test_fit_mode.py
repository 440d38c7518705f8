"""``--mode=fit`` end to end, in process, on a tiny mixture: grid files, report, resume; killed,
damaged and swapped runs repaired, failed cells reported."""

import json
import logging
import os

import numpy as np
import pytest
from damage import Killed, csv_rows, flip_bit, without

from configs import fit_gmm
from deis_jax.common.checks import ConfigError
from deis_jax.evaluation.metrics import nll_gap
from deis_jax.experiments import fit
from deis_jax.experiments.engine import FAILED
from deis_jax.experiments.fit import cells as fitting
from deis_jax.experiments.modes import get_mode, run_mode
from deis_jax.experiments.validation import validate_sampler
from deis_jax.fitting.amed import AmedPredictorFile
from deis_jax.fitting.grid_file import OptimizedGrid
from deis_jax.fitting.optimize import endpoint_samples
from deis_jax.fitting.recipes import FittedSampler
from deis_jax.sampling.sde import VPSDE
from deis_jax.sampling.solvers.registry import MAX_NFE

SDE = VPSDE.linear()


# AMED-Solver with AFS and a trained stepwise predictor (variant ``amed``): it spends odd
# budgets only, so its cells at the run's NFE 4 spend 5 (fit_gmm's nfe_rounding "up")
AMED = "amed:afs=true,predictor=stepwise"
AMED_METHOD = "amed:afs=True,predictor=stepwise"  # as the records name it


def tiny_config():
    config = fit_gmm.get_config()
    config.data.dims = (4,)
    config.data.scattered.dims = ()
    config.fit.recipes = ("ipndm3+ld3+table+afs",)  # one recipe: a fit_sampler cell
    config.fit.methods = (AMED, "ipndm3")
    config.fit.nfes = (4,)
    config.fit.fixed_grids = ("quadratic",)
    config.fit.variants = ("gits", "ld3", "ld3+table", "amed")
    config.fit.amed.update(steps=30, batch_size=8, learning_rate=0.05)  # configs/amed_gmm.py's
    config.fit.num_fit = 24
    config.fit.num_heldout = 32
    config.fit.teacher_points = 13
    config.fit.teacher_substeps = 2
    config.fit.heldout_substeps = 2
    config.fit.ld3.steps = 25
    config.fit.plot_nfe = 4
    return config


def test_fit_mode_writes_grids_report_and_resumes(tmp_path):
    """One run of every kind of cell (an AMED method and a grid method): the cells laid out,
    the grid and predictor files, the report; a second run computes nothing; the files drive
    sampler configs."""
    workdir = str(tmp_path)
    records = run_mode("fit", tiny_config(), workdir)
    cells = {(r["method"], r["variant"]): r for r in records}
    recipe = "recipe:ipndm3+ld3+table+afs"
    # amed only for AMED methods, grid fits only for the others; the recipe cell on its own
    assert set(cells) == {
        (AMED_METHOD, "default"), (AMED_METHOD, "fixed:quadratic"), (AMED_METHOD, "amed"),
        ("ipndm3", "default"), ("ipndm3", "fixed:quadratic"), ("ipndm3", "gits"),
        ("ipndm3", "ld3"), ("ipndm3", "ld3+table"), ("fit_sampler", recipe),
    }  # fmt: skip
    by_variant = {v: r for (m, v), r in cells.items() if m in ("ipndm3", "fit_sampler")}
    fitted = by_variant["ld3+table"]
    assert fitted["val_loss_fitted"] < fitted["val_loss_init"]
    grid = OptimizedGrid.load(os.path.join(workdir, fitted["grid_file"]))
    assert grid.learned_table and grid.nfe == 4 and grid.method == "ipndm"
    np.testing.assert_array_equal(grid.ts, fitted["ts"])
    amed = cells[(AMED_METHOD, "amed")]
    assert amed["nfe_budget"] == 4 and amed["nfe"] == 5
    assert amed["val_loss_fitted"] <= amed["val_loss_init"]
    learned = AmedPredictorFile.load(os.path.join(workdir, amed["grid_file"]))
    assert learned.method == "amed" and learned.afs and learned.nfe == 5
    for name in ("results.md", "results.csv", "rmse_vs_nfe.png", "grids.png", "loss_curves.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    # a second run computes nothing and returns the same records
    lines = open(os.path.join(workdir, "results.jsonl")).read().splitlines()
    again = run_mode("fit", tiny_config(), workdir)
    assert open(os.path.join(workdir, "results.jsonl")).read().splitlines() == lines
    assert json.dumps(again, sort_keys=True) == json.dumps(records, sort_keys=True)

    # the mixtures' NLL gap: every cell has it, and one recomputed directly agrees (the same
    # samples from the same compiled sampler, host float64 sums: rounding only)
    assert all(np.isfinite(r["nll_gap"]) and np.isfinite(r["reference_nll_gap"]) for r in records)
    config = tiny_config()
    config.sampler.update(method="ipndm", order=3, nfe=4)
    problem = fit.make_problem(config, SDE, "dim4")
    samples = endpoint_samples(validate_sampler(config).plan, problem.eps_fn, problem.x_heldout)
    data = problem.density.data_log_prob
    got = nll_gap(problem.density.log_prob, samples, data)
    np.testing.assert_allclose(got, cells[("ipndm3", "default")]["nll_gap"], rtol=1e-12)
    assert "NLL gap of the held-out samples" in open(os.path.join(workdir, "results.md")).read()
    # ... and a record from before the metric is recomputed, not reused
    old = without([cells[("ipndm3", "default")]], "nll_gap")[0]
    assert "no nll_gap" in fitting.artifact_problem(workdir, old, problem)
    assert fitting.artifact_problem(workdir, cells[("ipndm3", "default")], problem) is None

    # the fitted file drives a sampler config; another NFE is refused by name
    config = tiny_config()
    config.sampler.update(method="ipndm", order=3, nfe=4, grid="optimized",
                          grid_file=os.path.join(workdir, fitted["grid_file"]))  # fmt: skip
    assert np.array_equal(validate_sampler(config).ts, grid.ts)
    config.sampler.nfe = 5
    with pytest.raises(ConfigError, match="nfe: fitted for 4"):
        validate_sampler(config)

    # so does the fit_sampler cell's file (config.sampler.fitted_file): its own method and grid
    cell = by_variant[recipe]
    fitted_sampler = FittedSampler.load(os.path.join(workdir, cell["grid_file"]), SDE, nfe=4)
    assert cell["recipe"] == fitted_sampler.recipe and fitted_sampler.nfe == 4
    config = tiny_config()
    config.sampler.update(nfe=4, fitted_file=os.path.join(workdir, cell["grid_file"]))
    sampler = validate_sampler(config)
    np.testing.assert_array_equal(sampler.ts, cell["ts"])
    assert sampler.nfe == 4 and sampler.method == fitted_sampler.plan().method
    config.sampler.nfe = 6
    with pytest.raises(ConfigError, match=r"config.sampler.fitted_file is invalid: .*nfe: "
                       r"fitted for 4, asked for 6"):  # fmt: skip
        validate_sampler(config)


@pytest.mark.parametrize(
    "field,value,message",
    [("fit.methods", ("sddim",), "stochastic"), ("fit.variants", ("ld4",), "is not one of"),
     ("fit.gits_metric", "l3", "gits_metric must be one of"),
     ("fit.num_fit", 1, "num_fit must be >= 2")],
)  # fmt: skip
def test_bad_fit_fields_are_refused_by_name(field, value, message):
    config = tiny_config()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ConfigError, match=message):
        get_mode("fit").validate(config)


TOO_MANY = f"must be <= {MAX_NFE}, got 20000"


def test_fit_nfes_checked_by_the_methods_rule():
    config = fit_gmm.get_config()
    config.fit.nfes = (4, 20000)
    with pytest.raises(ConfigError, match=f"config.fit.nfes entry 20000: {TOO_MANY}"):
        fit.validate(config)


# --- killed, failed, damaged and swapped runs ----------------------------------------------


def tiny_fit_config():
    config = fit_gmm.get_config()
    config.data.dims = (4,)
    config.data.scattered.dims = ()
    config.fit.update(methods=("ipndm3",), nfes=(4,), fixed_grids=(), variants=("gits",),
                      recipes=(),
                      num_fit=16, num_heldout=16, teacher_points=9, teacher_substeps=1,
                      heldout_substeps=1, plot_nfe=4)  # fmt: skip
    return config


def test_fit_kill_damage_swap_and_restart(tmp_path, monkeypatch, caplog):
    workdir, calls = str(tmp_path), []
    compute_cell = fitting.compute_cell

    def counted(settings, schedule, problem, teach, choice, nfe, variant, *args, **kwargs):
        if variant == "gits" and kill[0]:
            raise Killed
        calls.append(variant)
        return compute_cell(settings, schedule, problem, teach, choice, nfe, variant, *args,
                            **kwargs)  # fmt: skip

    kill = [True]
    monkeypatch.setattr(fitting, "compute_cell", counted)
    with pytest.raises(Killed):
        fit.run(tiny_fit_config(), workdir)
    # the killed run's report holds the cell it finished (the killed one blank), no plots yet
    (done,) = csv_rows(os.path.join(workdir, "results.csv"))
    assert done["variant"] == "default" and float(done["heldout_rmse"]) > 0
    assert "| ipndm3 | default |" in open(os.path.join(workdir, "results.md")).read()
    assert not os.path.exists(os.path.join(workdir, "rmse_vs_nfe.png"))
    kill[0] = False
    resumed = fit.run(tiny_fit_config(), workdir)
    assert calls == ["default", "gits"] and len(csv_rows(os.path.join(workdir, "results.csv"))) == 2
    assert os.path.getsize(os.path.join(workdir, "rmse_vs_nfe.png")) > 0
    grid_path = os.path.join(workdir, resumed[1]["grid_file"])
    grid_text = open(grid_path).read()

    flip_bit(os.path.join(workdir, "teachers", "dim4_heldout.npz"))
    os.remove(grid_path)
    os.remove(os.path.join(workdir, "results.csv"))
    calls.clear()
    with caplog.at_level(logging.WARNING):
        repaired = fit.run(tiny_fit_config(), workdir)
    assert (
        f"teacher cache {os.path.join(workdir, 'teachers', 'dim4_heldout.npz')} is unreadable"
        in caplog.text
    )
    assert f"(cell dim4|ipndm3|4|gits): its file {grid_path} is missing" in caplog.text
    timing = ("fit_seconds", "grid_sha256")  # the grid file's provenance holds the fit time
    assert calls == ["gits"] and without(repaired, *timing) == without(resumed, *timing)

    # a grid file of another fit swapped in: its cell is computed again, the file rewritten
    foreign = OptimizedGrid.load(grid_path)
    OptimizedGrid(foreign.ts * np.r_[1.0, 0.9, 0.9, 0.9, 1.0], "ipndm", 3, 4, {}, foreign.schedule,
                  "gits").save(grid_path)  # fmt: skip
    calls.clear()
    with caplog.at_level(logging.WARNING):
        fit.run(tiny_fit_config(), workdir)
    assert calls == ["gits"] and "is not the one the cell wrote" in caplog.text
    assert np.array_equal(OptimizedGrid.load(grid_path).ts, json.loads(grid_text)["ts"])


def test_fit_report_shows_failed_cells(tmp_path):
    records = [
        {"problem": "dim4", "method": "ipndm3", "variant": v, "nfe_budget": 4, "nfe": 4,
         "heldout_rmse": r, "reference_error": 1e-6, "ts": [1.0, 0.5, 0.1, 0.01, 0.001],
         **({} if r else {FAILED: "held-out samples non-finite (their RMSE is not finite)"})}
        for v, r in (("default", 0.3), ("gits", None))
    ]  # fmt: skip
    fitting.write_report(str(tmp_path), records, ["default", "gits"], [4], 4)
    md = (tmp_path / "results.md").read_text()
    assert "| ipndm3 | gits | failed |" in md and "| ipndm3 | default | 0.3 |" in md
    (_, gits) = csv_rows(tmp_path / "results.csv")
    assert gits["heldout_rmse"] == "" and "non-finite" in gits[FAILED]
