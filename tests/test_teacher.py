"""The shared teacher: trajectories on a fine grid, their accuracy, and the .npz cache."""

import json
import logging
import os

import jax
import numpy as np
import pytest

import deis_jax as deis
from deis_jax.common.identity import array_digest, describe_object
from deis_jax.evaluation.reference import reference_solve
from deis_jax.fitting import teacher as teacher_module
from deis_jax.fitting.teacher import (
    Teacher,
    halve_grid,
    load_or_solve_teacher,
    load_teacher,
    refine_grid,
    save_teacher,
    solve_teacher,
    teacher_settings,
)

SDE = deis.VPSDE.linear()
RING = deis.GaussianMixture.ring()


def _x_T(n, dim, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim))


EPS_FN = RING.eps_fn(SDE)  # one object, so repeated solves reuse the compiled loop
SMALL_KW = {"num_points": 9, "substeps": 2}  # most tests share this teacher (one compile)


@pytest.fixture
def solves(monkeypatch):
    """Records the settings of every solve ``load_or_solve_teacher`` runs."""
    calls = []
    real = teacher_module.solve_teacher

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_module, "solve_teacher", counted)
    return calls


@pytest.fixture(scope="module")
def small_teacher():
    return solve_teacher(SDE, EPS_FN, _x_T(12, 2), **SMALL_KW)


def _assert_same(a: Teacher, b: Teacher):
    for name in ("ts", "x_T", "x0", "states", "eps"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.settings == b.settings
    assert a.error_estimate == b.error_estimate


@pytest.mark.numerics
def test_refine_grid_keeps_the_fine_nodes_and_is_uniform_in_log_snr():
    ts = deis.time_grid(SDE, 6, "quadratic", t0=1e-3)
    refined = refine_grid(SDE, ts, 4)
    assert refined.shape == (25,)
    np.testing.assert_array_equal(refined[::4], ts)
    log_snr = SDE.log_snr(refined).reshape(-1)
    steps = np.diff(log_snr)[:24].reshape(6, 4)
    np.testing.assert_allclose(steps, steps[:, :1] * np.ones((1, 4)), rtol=1e-9)
    # a log-SNR fine grid refined in log-SNR is the finer log-SNR grid
    fine = deis.time_grid(SDE, 5, "log_snr", t0=1e-3)
    np.testing.assert_allclose(
        refine_grid(SDE, fine, 3), deis.time_grid(SDE, 15, "log_snr", t0=1e-3), rtol=1e-12
    )
    np.testing.assert_array_equal(halve_grid(refined), refined[::2])
    odd = refined[:-1]
    np.testing.assert_array_equal(halve_grid(odd), np.append(odd[::2], odd[-1]))


def test_teacher_states_endpoints_and_eps(small_teacher):
    t = small_teacher
    assert t.num_points == 9 and t.num_samples == 12
    np.testing.assert_array_equal(t.ts, deis.time_grid(SDE, 8, "log_snr"))
    assert t.states.shape == (12, 9, 2) and t.eps.shape == (12, 8, 2)
    assert t.x0.dtype == np.float64 and t.states.dtype == np.float64
    np.testing.assert_array_equal(t.states[:, 0], t.x_T)
    np.testing.assert_array_equal(t.states[:, -1], t.x0)
    eps_fn = jax.jit(EPS_FN)
    for k in (0, 4, 7):
        np.testing.assert_allclose(
            t.eps[:, k], eps_fn(t.states[:, k], t.ts[k]), rtol=1e-12, atol=1e-14
        )
    settings = t.settings
    assert settings["solver"] == {"method": "rhork", "order": 4}
    assert settings["num_points"] == 9 and settings["substeps"] == 2
    assert settings["grid"] == "log_snr" and settings["dtype"] == "float64"
    assert settings["x_T_sha256"] == array_digest(t.x_T)
    assert settings["schedule"]["class"] == "VPSDE" and settings["schedule"]["beta_max"] == 20.0
    assert json.loads(json.dumps(settings)) == settings


@pytest.mark.numerics
def test_teacher_matches_a_reference_solve():
    mixture = deis.GaussianMixture.embedded(8)
    eps_fn = mixture.eps_fn(SDE)
    x_T = _x_T(16, 8, seed=3)
    teacher = solve_teacher(SDE, eps_fn, x_T, substeps=8, keep_states=False)
    assert teacher.states is None and teacher.eps is None
    ref = reference_solve(SDE, eps_fn, x_T, t0=SDE.default_t0, t1=SDE.default_t1, steps=400)
    assert ref.error_estimate < 1e-9
    error = float(np.sqrt(np.mean((teacher.x0 - ref.x0) ** 2)))
    assert error < 3e-8
    # the Richardson estimate tracks the actual error
    assert error / 3 < teacher.error_estimate < 3 * error


def test_batches_do_not_change_the_teacher(small_teacher):
    batched = solve_teacher(SDE, EPS_FN, small_teacher.x_T, batch_size=5, **SMALL_KW)
    for name in ("x0", "states", "eps"):
        np.testing.assert_allclose(
            getattr(batched, name), getattr(small_teacher, name), rtol=1e-12, atol=1e-14
        )
    assert batched.settings == small_teacher.settings


def test_x_T_digest_is_of_its_values(small_teacher):
    x32 = small_teacher.x_T.astype(np.float32)
    assert array_digest(x32) == array_digest(x32.astype(np.float64))
    assert array_digest(x32) != array_digest(small_teacher.x_T)
    assert array_digest(x32) != array_digest(x32.reshape(2, 6, 2))
    settings = teacher_settings(SDE, x32, **SMALL_KW)
    assert settings["x_T_sha256"] == array_digest(x32) and settings["x_T_shape"] == [12, 2]


def test_save_load_round_trip_is_exact(tmp_path, small_teacher):
    path = str(tmp_path / "teacher.npz")
    save_teacher(path, small_teacher)
    _assert_same(load_teacher(path), small_teacher)
    light = load_teacher(path, states=False)
    assert light.states is None and light.eps is None
    np.testing.assert_array_equal(light.x0, small_teacher.x0)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_load_or_solve_reuses_and_recomputes(tmp_path, solves):
    path = str(tmp_path / "cache" / "teacher.npz")
    x_T = _x_T(12, 2)

    first = load_or_solve_teacher(path, SDE, EPS_FN, x_T, model_id="m1", **SMALL_KW)
    assert len(solves) == 1 and first.settings["model_id"] == "m1"
    again = load_or_solve_teacher(path, SDE, EPS_FN, x_T, model_id="m1", batch_size=4, **SMALL_KW)
    assert len(solves) == 1
    _assert_same(again, first)

    # a request without states is served by the file with states
    light = load_or_solve_teacher(
        path, SDE, EPS_FN, x_T, model_id="m1", keep_states=False, **SMALL_KW
    )
    assert len(solves) == 1 and light.states is None and light.settings["keep_states"] is False
    np.testing.assert_array_equal(light.x0, first.x0)

    changes = [
        ({"model_id": "m2"}, "model_id"),
        ({"x_T": x_T + 1e-9}, "x_T_sha256"),
        ({"error_samples": 5}, "error_samples"),
        ({"num_points": 8}, "num_points"),
    ]
    for change, key in changes:
        args = {"model_id": "m1", **SMALL_KW, "x_T": x_T, **change}
        solves.clear()
        teacher = load_or_solve_teacher(path, SDE, EPS_FN, **args)
        assert len(solves) == 1, key
        assert load_teacher(path).settings[key] == teacher.settings[key] != first.settings[key]
        load_or_solve_teacher(path, SDE, EPS_FN, **args)
        assert len(solves) == 1, key  # the overwritten file is reused

    # a file without states does not serve a request with states
    solves.clear()
    load_or_solve_teacher(path, SDE, EPS_FN, x_T, model_id="m3", keep_states=False, **SMALL_KW)
    full = load_or_solve_teacher(path, SDE, EPS_FN, x_T, model_id="m3", **SMALL_KW)
    assert len(solves) == 2 and full.states is not None


def test_torn_or_corrupt_file_is_recomputed(tmp_path, caplog, solves):
    path = str(tmp_path / "teacher.npz")
    x_T = _x_T(12, 2)
    kw = {"model_id": "m", **SMALL_KW}
    good = load_or_solve_teacher(path, SDE, EPS_FN, x_T, **kw)
    with open(path, "rb") as f:
        data = f.read()

    def write(payload):
        with open(path, "wb") as f:
            f.write(payload)

    bad_settings = dict(np.load(path))
    bad_settings["settings"] = np.array("{not json")
    corruptions = {
        "truncated": lambda: write(data[: len(data) // 2]),
        "empty": lambda: write(b""),
        "bad json": lambda: np.savez(path, **bad_settings),
        "missing key": lambda: np.savez(path, ts=good.ts),
    }
    for name, corrupt in corruptions.items():
        corrupt()
        solves.clear()
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            teacher = load_or_solve_teacher(path, SDE, EPS_FN, x_T, **kw)
        assert len(solves) == 1, name
        assert any("recomputing" in r.getMessage() for r in caplog.records), name
        np.testing.assert_array_equal(teacher.x0, good.x0)
        _assert_same(load_teacher(path), good)


def test_describe_schedule_sees_arrays():
    a = deis.DiscreteVPSDE.linear(beta_end=0.02)
    b = deis.DiscreteVPSDE.linear(beta_end=0.021)
    assert repr(a) == repr(b)  # why repr is not enough
    assert describe_object(a) != describe_object(b)
    assert describe_object(a)["alphas_cumprod"].startswith("sha256:")
    assert describe_object(SDE) == describe_object(deis.VPSDE.linear())
    assert describe_object(SDE) != describe_object(deis.VPSDE.linear(beta_max=19.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_points": 1}, "num_points"),
        ({"substeps": 0}, "substeps"),
        ({"grid": "custom"}, "grid must be one of"),
        ({"grid": "log_snr", "grid_power": 2.0}, "grid_power"),
        ({"batch_size": 0}, "batch_size"),
        ({"error_samples": 0}, "error_samples"),
        ({"t0": 2.0}, "t0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve_teacher(SDE, EPS_FN, _x_T(2, 2), **kwargs)
