"""``--mode=table`` with the AMED paper's table: the predictor files of
``config.eval.amed_predictors`` (named as ``--mode=fit`` writes them), checked before any
sampling, their content part of the cells' keys."""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from test_table import digits_mixture_model, float32_jax, tiny_config  # noqa: E402, F401

from deis_jax.common.checks import ConfigError  # noqa: E402
from deis_jax.common.files import sha256_file  # noqa: E402
from deis_jax.experiments import build, table  # noqa: E402
from deis_jax.experiments.scoring import SampleScorer  # noqa: E402
from deis_jax.experiments.table import cells as tb  # noqa: E402
from deis_jax.fitting.amed import AmedPredictorFile, init_params  # noqa: E402
from deis_jax.models.loading import LoadedModel, image_shape  # noqa: E402
from deis_jax.sampling.amed_predictor import init_predictor  # noqa: E402
from deis_jax.sampling.method_spec import parse_method_spec  # noqa: E402
from deis_jax.sampling.sampler import make_plan  # noqa: E402
from deis_jax.sampling.wrappers import eps_fn_from_model  # noqa: E402

SPEC = tb.TABLES["amed_cifar10"]
ROW = {r.label: r for r in SPEC.rows}
AMED_SOLVER = ("amed", {}, "linear")
AMED_PLUGIN = ("amed_ipndm", {"scale_time": 0.2}, "karras")


def amed_config(methods, nfes):
    config = tiny_config()
    config.table = "amed_cifar10"
    config.eval.methods, config.eval.nfes = methods, nfes
    return config


def predictor_plan(config, method, options, grid, nfe):
    schedule = build.schedule_from_config(config.sde)
    return make_plan(schedule, method=method, nfe=nfe, afs=True, grid=grid,
                     t0=config.sampler.t0, t1=config.sampler.t1, **options)  # fmt: skip


def write_untrained(path, config, method, options, grid, nfe, seed=0):
    """A predictor file with fresh (untrained) parameters: enough for the checks."""
    plan = predictor_plan(config, method, options, grid, nfe)
    params = init_predictor(plan.rule.predictor, jax.random.PRNGKey(seed), 4)
    AmedPredictorFile.from_plan(plan, params).save(str(path))
    return str(path)


def test_every_row_builds_and_afs_rows_spend_exactly_the_odd_budgets(tmp_path):
    config = amed_config(None, None)
    directory = tmp_path / "grids" / "digits"
    for (method, options, grid), label in ((AMED_SOLVER, "AMED-Solver"),
                                           (AMED_PLUGIN, "AMED-Plugin")):  # fmt: skip
        for nfe in SPEC.nfes:
            path = ROW[label].predictor_path(str(directory), nfe)
            # the name --mode=fit gives the file of this method and NFE
            choice = parse_method_spec(ROW[label].spec)
            assert path == build.grid_path(str(tmp_path), "digits", choice.label, nfe, "amed")
            write_untrained(path, config, method, options, grid, nfe)
    config.eval.amed_predictors = str(directory)
    plan = table.validate(config)
    assert len(plan.rows) == 8 and plan.nfes == [3, 5, 7, 9] and len(plan.cells) == 32
    for cell in plan.cells:
        row, nfe, sampler, predictor = cell.payload
        assert sampler.nfe == nfe, (row.label, nfe)
        assert (predictor is not None) == row.needs_predictor
        if predictor is not None:
            assert sampler.rule_params is not None and predictor[1] in cell.key
    assert os.path.basename(ROW["AMED-Plugin"].predictor_path("d", 5)) == (
        "amed_ipndm3_afs-True_scale_time-0.2_nfe5_amed.json"
    )
    assert "amed_cifar10" in tb.TABLES["ipndm_ersde_dpmpp"].notes


def test_predictor_files_are_checked_before_any_sampling(tmp_path, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the predictor files were checked")

    monkeypatch.setattr(SampleScorer, "score", no_sampling)
    config = amed_config(("DDIM", "AMED-Solver", "AMED-Plugin"), (3, 5))
    directory = tmp_path / "preds"
    present = write_untrained(ROW["AMED-Solver"].predictor_path(str(directory), 3), config,
                              *AMED_SOLVER, 3)  # fmt: skip
    config.eval.amed_predictors = str(directory)
    with pytest.raises(ConfigError, match="3 AMED predictor file") as err:
        table.run(config, str(tmp_path))
    message = str(err.value)
    for label, nfe in (("AMED-Solver", 5), ("AMED-Plugin", 3), ("AMED-Plugin", 5)):
        assert ROW[label].predictor_path(str(directory), nfe) in message
    assert present not in message and "--mode=fit" in message

    # A file trained for other settings is refused with the file's message, naming it.
    config.eval.methods, config.eval.nfes = ("AMED-Solver",), (3,)
    write_untrained(present, config, *AMED_SOLVER, 5)  # an NFE-5 predictor under the NFE-3 name
    with pytest.raises(ConfigError, match="trained for other settings: nfe: trained for 5"):
        table.run(config, str(tmp_path))
    write_untrained(present, config, "amed", {}, "karras", 3)  # not the row's grid
    with pytest.raises(ConfigError, match=r"another time grid than the row's 'linear' grid"):
        table.validate(config)


def test_without_predictors_the_amed_rows_are_skipped_with_a_note(tmp_path):
    config = amed_config(("DDIM", "AMED-Solver"), (3,))
    config.eval.rmse, config.eval.num_samples, config.eval.batch_size = False, 8, 8
    assert config.eval.amed_predictors is None
    plan = table.validate(config)
    assert [c.payload[0].label for c in plan.cells] == ["DDIM"]
    records = table.run(config, str(tmp_path), plan, model=digits_mixture_model(config))
    assert [r["method"] for r in records] == ["DDIM"]
    md = open(os.path.join(tmp_path, "tables", "amed_cifar10", "table.md")).read()
    assert "AMED rows (AMED-Solver) were not run" in md
    assert ("train predictors with --mode=fit, configs/amed_digits.py, then pass "
            "--config.eval.amed_predictors=<dir>") in md  # fmt: skip
    assert "18.49" in md and "93.36" in md  # the paper's AMED-Solver / DDIM at NFE 3


def mixture_model_with_features(config) -> LoadedModel:
    """The digits mixture of ``test_table`` as a network with a bottleneck feature (the
    channel mean of x): the paper's bottleneck predictor runs on it, no network needed."""
    schedule = build.schedule_from_config(config.sde)
    eps = digits_mixture_model(config).bind(None)

    def model_fn(x, t, features=False):
        out = eps(x, t)
        return (out, jnp.mean(x, axis=-1).reshape(x.shape[0], -1)) if features else out

    eps_fn = eps_fn_from_model(model_fn, schedule, "eps", time_input=lambda t: t)
    return LoadedModel(lambda params: eps_fn, None, {"model": "digits mixture + features"})


@pytest.mark.usefixtures("float32_jax")
def test_amed_table_end_to_end_zero_predictor_is_dpm_solver_2(tmp_path, monkeypatch):
    """A zero-weight predictor (r = 1/2, c = a = 1) makes AMED-Solver DPM-Solver-2: on one
    grid their cells agree. (The registered DPM-Solver-2 row is on EDM's grid, the
    AMED-Solver row on the time-uniform one: the test puts DPM-Solver-2 on the latter.)"""
    rows = tuple(dataclasses.replace(r, overrides={"grid": "linear"})
                 if r.label == "DPM-Solver-2" else r for r in SPEC.rows)  # fmt: skip
    monkeypatch.setitem(tb.TABLES, "amed_cifar10", dataclasses.replace(SPEC, rows=rows))
    config = amed_config(("DPM-Solver-2", "AMED-Solver"), (3,))
    ev = config.eval
    ev.rmse, ev.num_samples, ev.batch_size = False, 16, 16
    workdir = str(tmp_path)
    model = mixture_model_with_features(config)
    plan = predictor_plan(config, *AMED_SOLVER, 3)
    x_T = jnp.zeros((1, *image_shape(config)), jnp.float32)
    # the bottleneck predictor (256 features): its shapes, all weights zero
    shapes = jax.eval_shape(lambda: init_params(plan, model.eps_fn(), x_T))
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    directory = os.path.join(workdir, "grids", "digits")
    path = ROW["AMED-Solver"].predictor_path(directory, 3)
    AmedPredictorFile.from_plan(plan, zero).save(path)
    ev.amed_predictors = directory

    calls = []
    score = SampleScorer.score

    def counted(scorer, sampler, advance=None):
        calls.append(sampler.method)
        return score(scorer, sampler, advance)

    monkeypatch.setattr(SampleScorer, "score", counted)
    records = table.run(config, workdir, model=model)
    by_method = {r["method"]: r for r in records}
    assert list(by_method) == ["DPM-Solver-2", "AMED-Solver"] and calls == ["dpm2", "amed"]
    dpm2, amed = by_method["DPM-Solver-2"], by_method["AMED-Solver"]
    assert dpm2["nfe"] == amed["nfe"] == 3
    assert np.isfinite(amed["value"]) and amed["value"] > 0
    assert amed["value"] == pytest.approx(dpm2["value"], rel=1e-4)  # float32 sampling
    assert amed["predictor_sha256"] == sha256_file(path) and dpm2.get("predictor_sha256") is None
    out = os.path.join(workdir, "tables", "amed_cifar10")
    md = open(os.path.join(out, "table.md")).read()
    assert "AMED-Solver" in md and "18.49" in md and "155.7" in md
    assert sha256_file(path) in open(os.path.join(out, "table.csv")).read()

    # A retrained predictor (other content, same name) is a new cell: only it is recomputed.
    key_before = table.validate(config).cells[1].key
    retrained = jax.tree.map(lambda a: a + 0.01, zero)
    AmedPredictorFile.from_plan(plan, retrained).save(path)
    new_plan = table.validate(config)
    assert new_plan.cells[1].key != key_before and sha256_file(path) in new_plan.cells[1].key
    records = table.run(config, workdir, new_plan, model=model)
    assert calls == ["dpm2", "amed", "amed"]
    retrained_cell = {r["method"]: r for r in records}["AMED-Solver"]
    assert retrained_cell["predictor_sha256"] == sha256_file(path)
    assert retrained_cell["value"] != pytest.approx(amed["value"], rel=1e-4)  # r != 1/2 now
