"""Integrity follow-ups: failed GMM cells shown as failed (compare and sweep, stochastic methods
included), sealed AMED predictor files, AMED resume state checked, reference solves past the
NFE cap, and NFE lists checked at start-up by the methods' rule."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deis_jax.common.checks import ConfigError
from deis_jax.evaluation.analytic import GaussianMixture
from deis_jax.evaluation.reference import ReferenceSolve, reference_solve
from deis_jax.experiments import compare, fit, gmm
from deis_jax.experiments import sweep as sweep_mode
from deis_jax.experiments.modes import run_mode
from deis_jax.experiments.sweep import cells as sweep
from deis_jax.fitting.amed import AmedPredictorFile, amed_teacher, fit_amed
from deis_jax.sampling.sampler import make_plan, sample
from deis_jax.sampling.sde import VPSDE
from deis_jax.sampling.solvers.registry import MAX_NFE
from deis_jax.sampling.timesteps import time_grid
from deis_jax.sampling.wrappers import model_argument

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import fit_gmm  # noqa: E402
import gmm_vpsde  # noqa: E402

SDE = VPSDE()


@pytest.fixture
def keep_x64():
    value = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", value)


@pytest.fixture
def nan_eps_above(monkeypatch):
    """``set(t_nan)``: every mixture's eps is NaN at times ``t > t_nan``, and the reference
    solve is replaced by a finite stand-in (only the samplers' cells may fail)."""
    exact = GaussianMixture.eps_fn

    def set_threshold(t_nan: float) -> None:
        def eps_fn(self, schedule):
            f = exact(self, schedule)

            def nan_above(x, t):
                t = jnp.reshape(jnp.asarray(t), (-1,) + (1,) * (x.ndim - 1))
                return jnp.where(t > t_nan, jnp.nan, f(x, t))

            return nan_above

        monkeypatch.setattr(GaussianMixture, "eps_fn", eps_fn)

    def finite_reference(schedule, eps_fn, x_T, *, t0, t1, steps):
        return ReferenceSolve(np.zeros(x_T.shape), 0.0, 2 * steps, 8 * steps)

    monkeypatch.setattr(gmm, "reference_solve", finite_reference)
    return set_threshold


def compare_config(**compare_fields):
    config = gmm_vpsde.get_config()
    config.data.dims = (2,)
    config.compare.update(methods=("ddim", "sddim"), nfes=(3,), num_samples=8,
                          reference_steps=10, scatter_nfe=3, x64=False)  # fmt: skip
    config.compare.update(compare_fields)
    return config


# --- 1. failed cells are shown as failed ----------------------------------------------------


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


# --- 2. AMED predictor files and resume state --------------------------------------------


def _predictor_file(path: str) -> AmedPredictorFile:
    plan = make_plan(SDE, method="amed", nfe=5, afs=True, predictor="stepwise")
    params = {"r_logit": jnp.full(plan.num_steps, 0.3), "c_logit": jnp.zeros(plan.num_steps)}
    predictor = AmedPredictorFile.from_plan(plan, params)
    predictor.save(path)
    return predictor


def test_amed_predictor_file_is_sealed(tmp_path):
    path = str(tmp_path / "p.json")
    saved = _predictor_file(path)
    text = open(path).read()
    assert len(json.loads(text)["sha256"]) == 64
    np.testing.assert_array_equal(AmedPredictorFile.load(path).params["r_logit"],
                                  saved.params["r_logit"])  # fmt: skip
    start = text.index('"r_logit": [') + len('"r_logit": [')
    digit = next(i for i in range(start, len(text)) if text[i].isdigit() and text[i] != "0")
    flipped = text[:digit] + chr(ord(text[digit]) ^ 1) + text[digit + 1 :]  # one bit: 3 -> 2
    assert json.loads(flipped)["params"] != json.loads(text)["params"]
    with open(path, "w") as f:
        f.write(flipped)
    with pytest.raises(ValueError, match=f"{path} does not match the sha256 recorded in it"):
        AmedPredictorFile.load(path)
    record = json.loads(flipped)
    del record["sha256"]  # a file without the entry (by hand, older deis_jax): read unchecked
    with open(path, "w") as f:
        json.dump(record, f)
    assert AmedPredictorFile.load(path).params["r_logit"][0] != saved.params["r_logit"][0]


def test_amed_resume_state_bit_flip_is_ignored_and_refit(tmp_path, caplog):
    with jax.enable_x64(True):
        config = gmm_vpsde.get_config()
        eps_fn = gmm.mixture_for_dim(config, 4).eps_fn(SDE)
        plan = make_plan(SDE, method="amed", nfe=3, afs=True, predictor="stepwise")
        x_fit = SDE.prior_sample(jax.random.PRNGKey(4), (12, 4), jnp.float64)
        teacher = amed_teacher(plan, eps_fn, x_fit, path=str(tmp_path / "t.npz"), model_id="m",
                               num_points=4, substeps=1)  # fmt: skip
        kwargs = dict(steps=4, learning_rate=0.05, batch_size=None)
        state = str(tmp_path / "amed_state" / "dim4_nfe3.state")
        full = fit_amed(plan, eps_fn, teacher, state_path=state, **kwargs)
        assert fit_amed(plan, eps_fn, teacher, state_path=state, **kwargs).loop.resumed_step == 4
        data = open(state, "rb").read()
        with open(state, "wb") as f:
            f.write(data[:-20] + bytes([data[-20] ^ 1]) + data[-19:])
        with caplog.at_level(logging.WARNING):
            again = fit_amed(plan, eps_fn, teacher, state_path=state, **kwargs)
    assert f"ignoring the unreadable training state {state}" in caplog.text
    assert "checksum mismatch" in caplog.text
    assert again.loop.resumed_step == 0
    for key in full.params.params:
        np.testing.assert_array_equal(again.params.params[key], full.params.params[key])


# --- 3. reference solves past the NFE cap ------------------------------------------------


def _tiny_problem():
    eps_fn = gmm.mixture_for_dim(gmm_vpsde.get_config(), 2).eps_fn(SDE)
    x_T = SDE.prior_sample(jax.random.PRNGKey(0), (4, 2), jnp.float32)
    return eps_fn, x_T


def test_reference_solve_is_the_rk4_plan_of_its_budget():
    """Below the cap the explicit grid gives exactly the plan the NFE budget gave."""
    eps_fn, x_T = _tiny_problem()
    ref = reference_solve(SDE, eps_fn, x_T, t0=1e-3, t1=1.0, steps=10)
    plan = make_plan(SDE, method="rhork", order=4, nfe=80, grid="log_snr", t0=1e-3, t1=1.0)
    assert (ref.steps, ref.nfe) == (20, 80)
    # the same grid (one host computation) and, through the compiled solve reference_solve
    # runs, the same samples bit for bit (an eager ``sample`` is another program)
    np.testing.assert_array_equal(time_grid(SDE, 20, "log_snr", t0=1e-3, t1=1.0), plan.ts)
    solve = jax.jit(sample, static_argnums=0)(plan, model_argument(eps_fn), x_T)
    np.testing.assert_array_equal(ref.x0, np.asarray(solve, np.float64))


def test_reference_solve_beyond_max_nfe():
    eps_fn, x_T = _tiny_problem()
    ref = reference_solve(SDE, eps_fn, x_T, t0=1e-3, t1=1.0, steps=2000)
    assert ref.nfe == 16000 > MAX_NFE and ref.steps == 4000
    assert np.all(np.isfinite(ref.x0)) and ref.error_estimate < 1e-5


# --- 4. NFE lists checked at start-up ------------------------------------------------------

TOO_MANY = f"must be <= {MAX_NFE}, got 20000"


def test_compare_nfes_checked_by_the_methods_rule():
    with pytest.raises(ConfigError, match=f"config.compare.nfes entry 20000: {TOO_MANY}"):
        compare.validate(compare_config(nfes=(3, 20000)))


def test_fit_nfes_checked_by_the_methods_rule():
    config = fit_gmm.get_config()
    config.fit.nfes = (4, 20000)
    with pytest.raises(ConfigError, match=f"config.fit.nfes entry 20000: {TOO_MANY}"):
        fit.validate(config)


def test_sweep_nfe_axis_checked_by_the_methods_rule():
    config = sweep.load_config_file(os.path.join(ROOT, "configs", "sweeps", "gmm_methods.py"))
    config.sweep.axes = (("sampler.spec", ("ddim",)), ("sampler.nfe", (3, 20000)))
    point = '{"sampler.nfe": 20000, "sampler.spec": "ddim"}'
    with pytest.raises(ConfigError) as err:
        sweep_mode.validate(config)
    assert str(err.value).startswith(f"sweep point {point}: config.sampler.nfe {TOO_MANY}")
