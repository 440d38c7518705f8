"""Fitting EPD / EPD-Plugin / AdaSDE probe tables by distillation (``fit_amed``'s entry
point) and their sealed file (``AmedPredictorFile``, kind ``probe``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import amed_gmm
from deis_jax.common.checks import ConfigError
from deis_jax.experiments import gmm
from deis_jax.experiments.validation import validate_sampler
from deis_jax.fitting.amed import AmedPredictorFile, amed_teacher, fit_amed
from deis_jax.sampling.sampler import make_plan, sample
from deis_jax.sampling.sde import VESDE, VPSDE

SDE = VPSDE()
KEY = jax.random.PRNGKey(3)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def mixture(dim=8):
    return gmm.mixture_for_dim(amed_gmm.get_config(), dim).eps_fn(SDE)


@pytest.mark.parametrize(
    "method, options",
    [pytest.param("epd", {}, marks=pytest.mark.slow),
     pytest.param("epd_ipndm", {"grid": "linear"}, marks=pytest.mark.slow),
     ("adasde", {"gamma_max": 0.05})],
)  # fmt: skip
def test_fitting_lowers_the_validation_loss(method, options, tmp_path):
    """40 Adam steps from the neutral tables on 48 starting points of an 8-D mixture at
    parallel NFE 5 (the endpoint loss: one scan to compile, seconds): the held-out validation
    loss falls by a margin (a no-op fit would keep it, a broken gradient would not lower it
    by 20%); the fitted file round-trips and samples identically. The stochastic AdaSDE runs
    by default; its deterministic peers (about 15 s each, mostly compilation) are slow."""
    eps_fn = mixture()
    plan = make_plan(SDE, method=method, parallel_nfe=5, afs=True, **options)
    x_fit = SDE.prior_sample(jax.random.PRNGKey(2), (48, 8), jnp.float64)
    teacher = amed_teacher(plan, eps_fn, x_fit, path=str(tmp_path / "t.npz"), model_id="m",
                           num_points=25, substeps=2)  # fmt: skip
    fit = fit_amed(plan, eps_fn, teacher, loss="endpoint", steps=40, learning_rate=0.05,
                   batch_size=12)  # fmt: skip
    assert fit.loop.best_val_loss < 0.8 * fit.loop.init_val_loss, fit.loop.val_loss

    path = str(tmp_path / "p.json")
    fit.predictor.save(path)
    loaded = AmedPredictorFile.load(path)
    again = loaded.plan(SDE)
    assert (again.nfe, again.parallel_nfe) == (plan.nfe, 5)
    x = x_fit[:4]
    key = KEY if plan.stochastic else None
    np.testing.assert_array_equal(
        sample(again, eps_fn, x, key, rule_params=loaded.rule_params()),
        sample(plan, eps_fn, x, key, rule_params=fit.params),
    )


def test_probe_file_refused_for_other_settings(tmp_path):
    """A probe-table file is taken by a config of its own settings and refused, naming the
    field, for another method, NFE, K or schedule; tables of the wrong shape are refused."""
    plan = make_plan(SDE, method="epd", nfe=8, afs=True)
    params = plan.rule.init_params(seed=1, init="normal")
    path = str(tmp_path / "p.json")
    AmedPredictorFile.from_plan(plan, params).save(path)
    config = amed_gmm.get_config()
    config.sampler.update(method="epd", order=0, nfe=8, predictor_file=path,
                          options={"afs": True})  # fmt: skip
    sampler = validate_sampler(config)
    assert sampler.plan.parallel_nfe == 5
    for field, change, message in (
        ("nfe", 11, "nfe: trained for 8, asked for 11"),
        ("method", "epd_ipndm", "method: trained for 'epd'"),
        ("options", {"afs": True, "probes": 3}, "options: trained for"),
    ):
        bad = amed_gmm.get_config()
        bad.sampler.update(method="epd", order=0, nfe=8, predictor_file=path,
                           options={"afs": True})  # fmt: skip
        bad.sampler[field] = change
        if field == "method":
            bad.sampler.order = 2
        if field == "options":
            bad.sampler.nfe = 11
        with pytest.raises(ConfigError, match=message):
            validate_sampler(bad)
    loaded = AmedPredictorFile.load(path)
    with pytest.raises(ValueError, match="schedule"):
        loaded.check_compatible(VESDE(), method="epd", order=0, nfe=8, options={"afs": True})
    record = loaded.to_record()
    record["params"]["r"] = record["params"]["r"][:-1]
    with pytest.raises(ValueError, match="params.r has shape"):
        AmedPredictorFile.from_record(record, "edited")


def test_fit_config_counts_parallel_budgets():
    """``configs/epd_gmm.py`` validates with its budgets read as parallel NFE (an EPD plan
    of parallel NFE 5 spends 8 evaluations); a budget EPD cannot spend and an unknown
    ``fit.budget`` are refused at start-up, naming the field."""
    from configs import epd_gmm
    from deis_jax.experiments.modes import get_mode

    mode = get_mode("fit")
    plan = mode.validate(epd_gmm.get_config())
    trained = {(c.payload[1].method, c.payload[2]) for c in plan.cells if c.payload[3] == "amed"}
    assert {("epd", 9), ("epd_ipndm", 3), ("adasde", 5), ("amed_ipndm", 7)} <= trained
    config = epd_gmm.get_config()
    config.sampler.nfe_rounding = "exact"  # the mixtures' configs round budgets up
    config.fit.nfes = (4,)
    with pytest.raises(ConfigError, match="fit.nfes entry 4: must be a budget"):
        mode.validate(config)
    config = epd_gmm.get_config()
    config.fit.budget = "rounds"
    with pytest.raises(ConfigError, match="config.fit.budget must be one of"):
        mode.validate(config)


def test_epd_paper_table_rows(tmp_path):
    """``--mode=table --config.table=epd_cifar10``: the EPD rows spend the table's NFE as
    parallel NFE (8 real evaluations at 5), AdaSDE and iPNDM as evaluations; each learned row
    reads its file (named as --mode=fit writes it) and shows the paper's number."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_table import tiny_config

    from deis_jax.experiments import build, table
    from deis_jax.experiments.table import cells as tb

    config = tiny_config()
    config.table = "epd_cifar10"
    config.eval.methods = ("iPNDM", "EPD-Solver", "EPD-Plugin", "AdaSDE")
    config.eval.nfes = (3, 5)
    spec = tb.TABLES["epd_cifar10"]
    directory = tmp_path / "grids"
    schedule = build.schedule_from_config(config.sde)
    for row in spec.select(("EPD-Solver", "EPD-Plugin", "AdaSDE")):
        for nfe in (3, 5):
            plan = row.sampler(config.sampler, schedule, nfe).plan
            AmedPredictorFile.from_plan(plan, plan.rule.init_params()).save(
                row.predictor_path(str(directory), nfe)
            )
    config.eval.amed_predictors = str(directory)
    plan = table.validate(config)
    spent = {(c.payload[0].label, c.payload[1]): c.payload[2] for c in plan.cells}
    assert (spent["EPD-Solver", 5].nfe, spent["EPD-Solver", 5].parallel_nfe) == (8, 5)
    assert (spent["EPD-Plugin", 3].nfe, spent["EPD-Plugin", 3].parallel_nfe) == (5, 3)
    assert spent["AdaSDE", 5].nfe == spent["iPNDM", 5].nfe == 5
    assert all(s.rule_params is not None for (label, _), s in spent.items() if label != "iPNDM")
    assert spec.select("EPD-Solver")[0].paper_value(5).value == 4.33
    assert spec.select("AdaSDE")[0].paper_value(5).value == 4.18
