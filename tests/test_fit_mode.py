"""``--mode=fit`` end to end, in process, on a tiny mixture: grid files, report, resume."""

import json
import os

import numpy as np
import pytest

from configs import fit_gmm
from deis_jax.config_validation import ConfigError, validate_sampler
from deis_jax.fitting.grid_file import OptimizedGrid
from deis_jax.fitting.recipes import FittedSampler
from deis_jax.modes import fit, get_mode, run_mode
from deis_jax.sampling.sde import VPSDE
from deis_jax.sampling.solvers.registry import MAX_NFE

SDE = VPSDE.linear()


def tiny_config():
    config = fit_gmm.get_config()
    config.data.dims = (4,)
    config.data.scattered.dims = ()
    config.fit.recipes = ("ipndm3+ld3+table+afs",)  # one recipe: a fit_sampler cell
    config.fit.methods = ("ipndm3",)
    config.fit.nfes = (4,)
    config.fit.fixed_grids = ("quadratic",)
    config.fit.variants = ("gits", "ld3+table")
    config.fit.num_fit = 24
    config.fit.num_heldout = 32
    config.fit.teacher_points = 13
    config.fit.teacher_substeps = 2
    config.fit.heldout_substeps = 2
    config.fit.ld3.steps = 25
    config.fit.plot_nfe = 4
    return config


def test_fit_mode_writes_grids_report_and_resumes(tmp_path):
    workdir = str(tmp_path)
    records = run_mode("fit", tiny_config(), workdir)
    by_variant = {r["variant"]: r for r in records}
    recipe = "recipe:ipndm3+ld3+table+afs"
    assert set(by_variant) == {"default", "fixed:quadratic", "gits", "ld3+table", recipe}
    fitted = by_variant["ld3+table"]
    assert fitted["val_loss_fitted"] < fitted["val_loss_init"]
    grid = OptimizedGrid.load(os.path.join(workdir, fitted["grid_file"]))
    assert grid.learned_table and grid.nfe == 4 and grid.method == "ipndm"
    np.testing.assert_array_equal(grid.ts, fitted["ts"])
    for name in ("results.md", "results.csv", "rmse_vs_nfe.png", "grids.png", "loss_curves.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    # a second run computes nothing and returns the same records
    lines = open(os.path.join(workdir, "results.jsonl")).read().splitlines()
    again = run_mode("fit", tiny_config(), workdir)
    assert open(os.path.join(workdir, "results.jsonl")).read().splitlines() == lines
    assert json.dumps(again, sort_keys=True) == json.dumps(records, sort_keys=True)

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
