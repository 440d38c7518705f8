"""``--mode=table``: every cell written, resume without recomputing, the paper column filled;
killed, damaged and swapped runs repaired, non-finite cells failed."""

from __future__ import annotations

import csv
import glob
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from damage import Killed, csv_rows, damaged_copies, flip_bit, flip_digit, without

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs import tables  # noqa: E402
from deis_jax.common.checks import ConfigError  # noqa: E402
from deis_jax.common.data import digits_images  # noqa: E402
from deis_jax.common.files import read_jsonl  # noqa: E402
from deis_jax.evaluation import fid  # noqa: E402
from deis_jax.evaluation.analytic import GaussianMixture  # noqa: E402
from deis_jax.experiments import build  # noqa: E402
from deis_jax.experiments.engine import FAILED  # noqa: E402
from deis_jax.experiments.modes import run_mode, table  # noqa: E402
from deis_jax.experiments.scoring import SampleScorer  # noqa: E402
from deis_jax.models.loading import LoadedModel  # noqa: E402

METHODS = ("ρ2Heun", "tAB2")
NFES = (5, 10)


def tiny_config():
    config = tables.get_config("vpsde_digits")
    config.model.nf = 8
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.table = "deis_cifar10"
    ev = config.eval
    ev.num_samples, ev.batch_size, ev.is_splits = 40, 20, 2
    ev.rmse_num_samples, ev.rmse_reference_steps = 6, 20
    ev.methods, ev.nfes = METHODS, NFES
    return config


def digits_mixture_model(config):
    """An exact "model": a Gaussian mixture centred on ten digits (exact eps, no network)."""
    schedule = build.schedule_from_config(config.sde)
    images = digits_images(16)[:10].astype(np.float64) / 127.5 - 1.0
    mixture = GaussianMixture(images.reshape(10, -1), np.full(10, 0.1), np.ones(10))
    flat_eps = mixture.eps_fn(schedule)

    def bind(params):
        return lambda x, t: flat_eps(x.reshape(x.shape[0], -1), t).reshape(x.shape)

    return LoadedModel(bind, None, {"model": "digits mixture"})


class Interrupt(Exception):
    pass


def test_table_writes_every_cell_resumes_and_fills_the_paper_column(tmp_path, monkeypatch):
    config = tiny_config()
    workdir = str(tmp_path)
    model = digits_mixture_model(config)
    calls, limit = [], [2]
    score = SampleScorer.score

    def counted(scorer, sampler, advance=None):
        if len(calls) == limit[0]:
            raise Interrupt  # a kill between two cells
        calls.append(sampler.method)
        return score(scorer, sampler, advance)

    monkeypatch.setattr(SampleScorer, "score", counted)
    plan = table.validate(config)
    with pytest.raises(Interrupt):
        table.run(config, workdir, plan, model=model)
    cache = os.path.join(workdir, "tables", "deis_cifar10", "cells.jsonl")
    assert len(list(read_jsonl(cache))) == 2
    first_mtime = os.path.getmtime(cache)

    limit[0] = 99
    records = table.run(config, workdir, plan, model=model)
    total = len(METHODS) * len(NFES)
    assert len(calls) == total  # 2 before the kill + the rest; no finished cell recomputed
    assert len(list(read_jsonl(cache))) == total and len(records) == total
    assert os.path.getmtime(cache) >= first_mtime

    # Re-running with everything cached samples nothing.
    before = len(calls)
    table.run(config, workdir, plan, model=model)
    assert len(calls) == before

    by_cell = {(r["method"], r["nfe_budget"]): r for r in records}
    heun5 = by_cell[("ρ2Heun", 5)]
    assert heun5["nfe"] == 6 and heun5["paper"] == 108 and heun5["paper_nfe"] == 6
    assert by_cell[("tAB2", 10)]["paper"] == pytest.approx(4.57)
    for r in records:
        assert r["num_samples"] == 40 and np.isfinite(r["value"]) and r["value"] >= 0
        assert r["rmse"] is not None and r["rmse"] > 10 * r["rmse_reference_error"]
        assert 1.0 <= r["is_mean"] <= 10.0
    # Higher order / more NFE: smaller discretisation error.
    assert by_cell[("tAB2", 10)]["rmse"] < by_cell[("ρ2Heun", 10)]["rmse"]
    assert by_cell[("tAB2", 10)]["rmse"] < by_cell[("tAB2", 5)]["rmse"]

    out = os.path.join(workdir, "tables", "deis_cifar10")
    md = open(os.path.join(out, "table.md")).read()
    assert "108⁺¹" in md and "16.31" in md and "26.91" not in md  # DDIM not run
    assert "RMSE vs a reference ODE solve" in md
    with open(os.path.join(out, "table.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == total and all(r["paper"] for r in rows)
    assert os.path.getsize(os.path.join(out, "metric_vs_nfe.png")) > 1000


def test_bad_table_config_fails_at_start(tmp_path):
    config = tiny_config()
    config.table = "nope"
    with pytest.raises(ConfigError, match="config.table must be one of"):
        table.validate(config)
    config = tiny_config()
    config.eval.methods = ("DDIM", "Euler")
    with pytest.raises(ConfigError, match="config.eval.methods"):
        table.validate(config)
    config = tiny_config()
    config.table, config.eval.methods, config.eval.nfes = "ipndm_ersde_dpmpp", None, None
    plan = table.validate(config)  # every row of the peer table builds
    assert len(plan.rows) == 7 and plan.nfes == [3, 5, 7, 9, 20] and len(plan.cells) == 35
    config = tiny_config()
    config.eval.metric = "fid"
    with pytest.raises(ConfigError, match="inception_weights.*download"):
        table.validate(config)


@pytest.fixture
def float32_jax():
    """``main.py`` runs without x64 (the test session enables it): do the same."""
    previous = jax.config.values["jax_enable_x64"]
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", previous)


def test_table_mode_runs_end_to_end_on_an_untrained_network(tmp_path, float32_jax):
    """What ``main.py --config=configs/tables.py:vpsde_digits --mode=table`` runs, in-process,
    on a tiny *untrained* network (wiring only)."""
    config = tiny_config()
    ev = config.eval
    ev.params, ev.methods, ev.nfes, ev.rmse = "random", ("tAB1",), (3,), False
    ev.num_samples, ev.batch_size, ev.export = 8, 8, f"{tmp_path}/export"
    run_mode("table", config, str(tmp_path))
    md = open(f"{tmp_path}/export.md").read()
    assert "tAB1" in md and "FD-digits" in md and "random" in md
    assert os.path.exists(f"{tmp_path}/export.png") and os.path.exists(f"{tmp_path}/export.csv")


def test_discretization_errors_against_the_exact_flow():
    from deis_jax import VPSDE
    from deis_jax.evaluation.discretization import discretization_errors

    sde = VPSDE.linear()
    gauss = GaussianMixture.gaussian(np.full(3, 0.2), 0.3)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
    result = discretization_errors(
        sde, gauss.eps_fn(sde), x_T, ["ddim", "tab3", "sddim"], [5, 10], reference_steps=40
    )
    exact = gauss.exact_flow(sde, x_T, 1.0, sde.default_t0)
    assert np.sqrt(np.mean((result.reference.x0 - exact) ** 2)) < 1e-4  # float32 reference
    assert result.reference_ok
    err = {(r["method"], r["nfe_budget"]): r["rmse"] for r in result.records}
    assert err[("sddim", 5)] is None  # stochastic: no ODE error
    assert err[("tab3", 10)] < err[("tab3", 5)] < err[("ddim", 5)]
    assert err[("tab3", 10)] < err[("ddim", 10)] < err[("ddim", 5)]


# --- killed, failed, damaged and swapped runs ----------------------------------------------


def tiny_table_config():
    config = tiny_config()
    ev = config.eval
    ev.update(num_samples=8, batch_size=8, inception_score=False, rmse=False,
              methods=("tAB1",), nfes=(3, 4), reference_max_images=16)  # fmt: skip
    return config


def test_table_kill_damage_swap_and_restart(tmp_path, monkeypatch, caplog):
    config, workdir = tiny_table_config(), str(tmp_path)
    model = digits_mixture_model(config)
    plan = table.validate(config)
    calls, score = [], SampleScorer.score

    def counted(scorer, sampler, advance=None):
        if len(calls) == 1 and kill[0]:
            raise Killed  # between the two cells
        calls.append(sampler.nfe)
        return score(scorer, sampler, advance)

    kill = [True]
    monkeypatch.setattr(SampleScorer, "score", counted)
    with pytest.raises(Killed):
        table.run(config, workdir, plan, model=model)
    kill[0] = False
    resumed = table.run(config, workdir, plan, model=model)
    assert calls == [3, 4]
    out = os.path.join(workdir, "tables", "deis_cifar10")
    resumed_csv = csv_rows(os.path.join(out, "table.csv"), "seconds")

    cache = os.path.join(out, "cells.jsonl")
    (reference,) = glob.glob(os.path.join(workdir, "tables", "reference_*.npz"))
    flip_digit(cache, "value", line=0)
    flip_bit(reference)  # the zip's CRC-32 catches it
    os.remove(os.path.join(out, "table.md"))
    calls.clear()
    with caplog.at_level(logging.WARNING):
        repaired = table.run(config, workdir, plan, model=model)
    assert f"{cache} line 1 (cell tAB1|tab1|{{}}|3)" in caplog.text
    assert f"statistics file {reference!r} is damaged" in caplog.text
    assert damaged_copies(reference) and damaged_copies(cache)
    assert calls == [3] and without(repaired, "seconds") == without(resumed, "seconds")
    assert csv_rows(os.path.join(out, "table.csv"), "seconds") == resumed_csv
    assert "| tAB1 |" in open(os.path.join(out, "table.md")).read()

    # statistics of another dataset swapped into the cache: not used, computed again
    other = fid.FeatureStats.from_features(np.random.default_rng(0).normal(size=(8, 64)))
    fid.save_stats(reference, other, extractor="digits_classifier", dataset="other")
    os.remove(cache)  # and the cells deleted: everything computed again, uninterrupted
    calls.clear()
    fresh = table.run(config, workdir, plan, model=model)
    assert calls == [3, 4] and without(fresh, "seconds") == without(resumed, "seconds")


def test_table_cell_with_nonfinite_samples_is_failed_not_a_number(tmp_path):
    config = tiny_table_config()
    config.eval.nfes = (3,)
    mixture = digits_mixture_model(config)
    model = LoadedModel(lambda p: (lambda x, t: jnp.nan * mixture.bind(p)(x, t)), None,
                        {"model": "NaN"})  # fmt: skip
    (record,) = table.run(config, str(tmp_path), model=model)
    assert record["value"] is None
    assert record[FAILED] == "8 of 8 samples non-finite (e.g. #0, #1, #2, #3, #4)"
    out = os.path.join(str(tmp_path), "tables", "deis_cifar10")
    md = open(os.path.join(out, "table.md")).read()
    assert "| tAB1 | failed |" in md and "## Failed cells" in md
    (row,) = csv_rows(os.path.join(out, "table.csv"))
    assert row["value"] == "" and "samples non-finite" in row[FAILED]
