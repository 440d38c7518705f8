"""Fitted grid files: exact round trip, refusal for other settings, use from configs."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as deis
from configs import gmm_vpsde
from deis_jax.common.checks import ConfigError
from deis_jax.common.identity import describe_object
from deis_jax.experiments.build import sampler_from_config
from deis_jax.experiments.validation import validate_sampler
from deis_jax.fitting.grid_file import OptimizedGrid
from deis_jax.sampling.sampler import make_plan, sample

SDE = deis.VPSDE.linear()
EPS = deis.GaussianMixture.ring().eps_fn(SDE)


def fitted_grid(corrections=None, **changes) -> OptimizedGrid:
    ts = deis.time_grid(SDE, 5, "log_snr", t0=1e-3, t1=1.0)
    ts[1:-1] *= 1.0 + 1e-3 * np.sin(np.arange(1, 5))  # not any fixed kind
    fields = dict(ts=ts, method="tab", order=3, nfe=5, options={}, schedule=describe_object(SDE),
                  objective="ld3", corrections=corrections,
                  max_delta=None if corrections is None else 0.1,
                  provenance={"val_loss_init": 1.0, "seconds": 2.5})  # fmt: skip
    fields.update(changes)
    return OptimizedGrid(**fields)


def test_round_trip_is_exact(tmp_path):
    raw = np.random.default_rng(0).normal(size=(5, 4))
    grid = fitted_grid(corrections=raw)
    path = str(tmp_path / "g.json")
    grid.save(path)
    back = OptimizedGrid.load(path)
    assert np.array_equal(back.ts, grid.ts) and np.array_equal(back.corrections, raw)
    assert back.settings() == grid.settings() and back.provenance == grid.provenance
    a, b = grid.plan(SDE), back.plan(SDE)
    for x, y in zip(a.table, b.table, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_plan_without_corrections_is_the_method_on_the_grid():
    grid = fitted_grid()
    x_T = jax.random.normal(jax.random.PRNGKey(0), (8, 2), jnp.float64)
    a = sample(grid.plan(SDE), EPS, x_T)
    b = deis.get_sampler(SDE, EPS, grid.ts, method="tab", order=3)(x_T)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "kwargs,field",
    [(dict(method="ipndm", order=3, nfe=5), "method"),
     (dict(method="tab", order=2, nfe=5), "order"),
     (dict(method="tab", order=3, nfe=6), "nfe"),
     (dict(method="tab", order=3, nfe=5, t0=1e-4), "t0"),
     (dict(method="tab", order=3, nfe=5, options={"quadrature_nodes": 8}), "options")],
)  # fmt: skip
def test_mismatched_settings_are_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=rf"{field}: fitted for"):
        fitted_grid().check_compatible(SDE, **{"t0": 1e-3, "t1": 1.0, **kwargs})


def test_other_schedule_is_refused():
    other = deis.VPSDE.linear(beta_max=19.0)
    with pytest.raises(ValueError, match="schedule: fitted for"):
        fitted_grid().check_compatible(other, method="tab", order=3, nfe=5, t0=1e-3, t1=1.0)
    with pytest.raises(ValueError, match="schedule"):
        fitted_grid().plan(other)


def test_damaged_or_foreign_files_are_refused(tmp_path):
    path = tmp_path / "g.json"
    fitted_grid().save(str(path))
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="damaged JSON"):
        OptimizedGrid.load(str(path))
    path.write_text(json.dumps({"ts": [1.0, 0.5]}))
    with pytest.raises(ValueError, match="not a deis_jax grid file"):
        OptimizedGrid.load(str(path))
    with pytest.raises(ValueError, match="decreasing"):
        dataclasses.replace(fitted_grid(), ts=np.array([0.5, 1.0]))


def gmm_config(path, **sampler):
    config = gmm_vpsde.get_config()
    config.sampler.grid = "optimized"
    config.sampler.grid_file = path
    config.sampler.nfe = 5
    for k, v in sampler.items():
        config.sampler[k] = v
    return config


def test_config_uses_the_grid_file(tmp_path):
    path = str(tmp_path / "g.json")
    fitted_grid().save(path)
    config = gmm_config(path)
    sampler = validate_sampler(config)
    np.testing.assert_array_equal(sampler.ts, fitted_grid().ts)
    built = sampler_from_config(config.sampler, SDE, EPS)
    assert np.array_equal(built.ts, fitted_grid().ts) and built.eps_fn is EPS


def test_config_refuses_a_grid_file_for_other_settings(tmp_path):
    path = str(tmp_path / "g.json")
    fitted_grid().save(path)
    with pytest.raises(ConfigError, match=r"config.sampler.grid_file is invalid: .*nfe: fitted"):
        validate_sampler(gmm_config(path, nfe=6))
    with pytest.raises(ConfigError, match=r"grid_file must name an existing grid file"):
        validate_sampler(gmm_config(str(tmp_path / "missing.json")))


def test_corrected_plan_differs_and_zero_corrections_do_not():
    zero = fitted_grid(corrections=np.zeros((5, 4)))
    base = make_plan(SDE, zero.ts, method="tab", order=3)
    for x, y in zip(zero.plan(SDE).table, base.table, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # equal raw values in a row are a zero correction (each row's correction sums to zero)
    bent = fitted_grid(corrections=np.random.default_rng(1).normal(size=(5, 4)))
    assert not np.array_equal(bent.plan(SDE).table.out_hist, base.table.out_hist)
