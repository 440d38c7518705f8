"""AMED training by distillation: the teacher, the loss, the predictor file, the fit mode."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import amed_gmm, gmm_vpsde
from deis_jax.common.checks import ConfigError
from deis_jax.experiments import gmm
from deis_jax.experiments.modes import get_mode
from deis_jax.experiments.validation import validate_sampler
from deis_jax.fitting.amed import (
    AmedPredictorFile,
    amed_teacher,
    fit_amed,
    per_sample_loss,
    student_targets,
    teacher_grid,
)
from deis_jax.fitting.teacher import solve_teacher
from deis_jax.sampling.rule_params import RuleParams
from deis_jax.sampling.sampler import make_plan, sample
from deis_jax.sampling.sde import VPSDE
from deis_jax.sampling.timesteps import time_grid

SDE = VPSDE()


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def mixture(dim=8):
    config = amed_gmm.get_config()
    return gmm.mixture_for_dim(config, dim).eps_fn(SDE)


def rmse(plan, eps_fn, x, x0, params=None):
    return float(
        np.sqrt(np.mean((np.asarray(sample(plan, eps_fn, x, rule_params=params)) - x0) ** 2))
    )


@pytest.mark.parametrize("method", ["amed", "amed_ipndm"])
def test_teacher_grid_contains_student_grid(method, tmp_path):
    """The AMED teacher is the grid fitter's (points uniform in log-SNR) with the student's
    grid points added exactly; its states are kept at those points only, and it is as
    accurate as the grid fitter's teacher."""
    plan = make_plan(SDE, method=method, nfe=5, afs=True, predictor="stepwise")
    fine = teacher_grid(plan, num_points=13)
    log_snr = time_grid(SDE, 12, "log_snr", t0=float(plan.ts[-1]), t1=float(plan.ts[0]))
    assert set(plan.ts) | set(log_snr) == set(fine) and np.all(np.diff(fine) < 0)
    x = SDE.prior_sample(jax.random.PRNGKey(0), (4, 8), jnp.float64)
    teacher = amed_teacher(plan, mixture(), x, path=str(tmp_path / "t.npz"), model_id="m",
                           num_points=13, substeps=2)  # fmt: skip
    np.testing.assert_array_equal(teacher.ts, plan.ts)  # states kept at the student's points
    assert teacher.settings["substeps"] == 2 and teacher.eps is None
    assert teacher.settings["state_ts"] == [float(t) for t in plan.ts]
    grid_fitters = solve_teacher(SDE, mixture(), x, t0=float(plan.ts[-1]), t1=float(plan.ts[0]),
                                 num_points=13, substeps=2, keep_states=False)  # fmt: skip
    # the same fine grid but for the few student points: the same accuracy, within 2x
    assert teacher.error_estimate < 2 * grid_fitters.error_estimate + 1e-12
    targets = student_targets(plan, teacher)
    assert targets.shape == (4, plan.num_steps, 8)
    np.testing.assert_array_equal(targets[:, -1], teacher.x0)
    other = make_plan(SDE, method=method, nfe=7, afs=True, predictor="stepwise")
    with pytest.raises(ValueError, match="does not contain the student's grid"):
        student_targets(other, teacher)


def test_teacher_forced_loss_is_zero_on_exact_steps():
    """A one-step student that reproduces its teacher exactly has zero loss: feed the
    student's own states as the 'teacher' targets."""
    plan = make_plan(SDE, method="amed", nfe=6, predictor="stepwise")
    eps_fn = mixture()
    x = SDE.prior_sample(jax.random.PRNGKey(1), (5, 8), jnp.float64)
    _, states = sample(plan, eps_fn, x, trajectory=True)
    params = {"r_logit": jnp.zeros(plan.num_steps), "c_logit": jnp.zeros(plan.num_steps)}
    loss = per_sample_loss(plan, params, eps_fn, x, jnp.moveaxis(states[1:], 0, 1))
    np.testing.assert_allclose(loss, 0.0, atol=1e-24)
    moved = jnp.moveaxis(states[1:], 0, 1).at[:, -1].add(0.1)  # only the last target moves
    np.testing.assert_allclose(per_sample_loss(plan, params, eps_fn, x, moved), 0.01, rtol=1e-9)


@pytest.fixture(scope="module")
def held_out():
    """``(x_held, x0)``: 128 held-out starting points of the 16-D mixture and their reference
    endpoints, solved once for every method (they do not depend on it)."""
    with jax.enable_x64(True):
        x_held = SDE.prior_sample(jax.random.PRNGKey(3), (128, 16), jnp.float64)
        ref = solve_teacher(SDE, mixture(16), x_held, num_points=31, substeps=4,
                            keep_states=False)  # fmt: skip
    return x_held, ref.x0


@pytest.mark.parametrize("method, options", [("amed", {}), ("amed_ipndm", {"scale_time": 0.2})])
def test_training_beats_the_base_solver_held_out(method, options, held_out, tmp_path):
    """A few hundred Adam steps on a small mixture: the NFE-5 held-out error falls below the
    base solver's (r = 1/2) on starting points never trained on; the saved file reloads and
    samples identically; a kill-and-resume gives the same predictor."""
    eps_fn = mixture(16)
    plan = make_plan(SDE, method=method, nfe=5, afs=True, predictor="stepwise", **options)
    x_fit = SDE.prior_sample(jax.random.PRNGKey(2), (64, 16), jnp.float64)
    x_held, x0 = held_out
    teacher = amed_teacher(plan, eps_fn, x_fit, path=str(tmp_path / "t.npz"), model_id="m")
    fit = fit_amed(plan, eps_fn, teacher, steps=200, learning_rate=0.05, batch_size=16)
    samples = np.asarray(sample(plan, eps_fn, x_held, rule_params=fit.params))
    base, trained = rmse(plan, eps_fn, x_held, x0), float(np.sqrt(np.mean((samples - x0) ** 2)))
    assert trained < 0.8 * base, (trained, base)
    assert fit.loop.best_val_loss < fit.loop.init_val_loss

    path = str(tmp_path / "p.json")
    fit.predictor.save(path)
    loaded = AmedPredictorFile.load(path)
    again = loaded.plan(SDE)
    np.testing.assert_array_equal(again.ts, plan.ts)
    assert again.nfe == 5 and again.afs
    np.testing.assert_array_equal(
        sample(again, eps_fn, x_held, rule_params=loaded.rule_params()), samples
    )


def test_training_resumes_where_it_stopped(tmp_path):
    eps_fn = mixture()
    plan = make_plan(SDE, method="amed", nfe=5, afs=True, predictor="stepwise")
    x_fit = SDE.prior_sample(jax.random.PRNGKey(4), (24, 8), jnp.float64)
    teacher = amed_teacher(plan, eps_fn, x_fit, path=str(tmp_path / "t.npz"), model_id="m")
    full = fit_amed(plan, eps_fn, teacher, steps=12, learning_rate=0.05, batch_size=6)
    state = str(tmp_path / "state")

    def die(step, train, val):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_amed(plan, eps_fn, teacher, steps=12, learning_rate=0.05, batch_size=6,
                 state_path=state, checkpoint_every=3, callback=die)  # fmt: skip
    resumed = fit_amed(plan, eps_fn, teacher, steps=12, learning_rate=0.05, batch_size=6,
                       state_path=state, checkpoint_every=3)  # fmt: skip
    assert resumed.loop.resumed_step > 0
    for key in full.params.params:
        np.testing.assert_array_equal(resumed.params.params[key], full.params.params[key])


def test_predictor_file_refused_for_other_settings(tmp_path):
    plan = make_plan(SDE, method="amed", nfe=5, afs=True, predictor="stepwise")
    params = {"r_logit": jnp.full(plan.num_steps, 0.3), "c_logit": jnp.zeros(plan.num_steps)}
    path = str(tmp_path / "p.json")
    AmedPredictorFile.from_plan(plan, params).save(path)
    config = amed_gmm.get_config()
    config.sampler.update(method="amed", order=2, nfe=5, predictor_file=path,
                          options={"afs": True, "predictor": "stepwise"})  # fmt: skip
    sampler = validate_sampler(config)
    np.testing.assert_array_equal(sampler.ts, plan.ts)
    eps_fn, x = mixture(), jnp.ones((2, 8))
    np.testing.assert_array_equal(
        sample(sampler.plan, eps_fn, x, rule_params=sampler.rule_params),
        sample(plan, eps_fn, x, rule_params=RuleParams.for_plan(plan, params)),
    )
    config.sampler.nfe = 7
    with pytest.raises(ConfigError, match="nfe: trained for 5, asked for 7"):
        validate_sampler(config)
    config.sampler.nfe = 5
    config.sampler.options = {"afs": False, "predictor": "stepwise"}
    with pytest.raises(ConfigError, match="afs: trained for True"):
        validate_sampler(config)
    config.sampler.options = {"afs": True, "predictor": "bottleneck"}
    with pytest.raises(ConfigError, match="options: trained for"):
        validate_sampler(config)
    config.sampler.options = {"afs": True, "predictor": "stepwise"}
    config.sampler.method = "amed_ipndm"
    config.sampler.order = 3
    with pytest.raises(ConfigError, match="method: trained for 'amed'"):
        validate_sampler(config)
    open(path, "w").write('{"format": "deis_jax.AmedPredictor", "vers')
    with pytest.raises(ConfigError, match="damaged JSON"):
        validate_sampler(config)


# the fit mode's AMED cells (layout, predictor file, report): tests/test_fit_mode.py's
# end-to-end run, which has an AMED method among its methods
def tiny_amed_config():
    config = amed_gmm.get_config()
    config.data.dims = (4,)
    config.fit.methods = (amed_gmm.AMED_SOLVER, "ipndm3")
    config.fit.nfes = (5,)
    config.fit.num_fit = 24
    config.fit.num_heldout = 32
    config.fit.teacher_points = 13
    config.fit.teacher_substeps = 2
    config.fit.heldout_substeps = 2
    config.fit.ld3.steps = 5
    config.fit.amed.steps = 30
    config.fit.amed.batch_size = 8
    return config


def test_amed_variant_needs_an_amed_method():
    config = tiny_amed_config()
    config.fit.methods = ("ipndm3",)
    with pytest.raises(ConfigError, match="config.fit.methods has no learned-rule method"):
        get_mode("fit").validate(config)


def test_loss_choices():
    from deis_jax.fitting.amed import resolve_loss

    one_step = make_plan(SDE, method="amed", nfe=6, predictor="stepwise")
    multistep = make_plan(SDE, method="amed_ipndm", nfe=6, predictor="stepwise")
    assert resolve_loss(one_step, "auto") == "teacher_forced"
    assert resolve_loss(multistep, "auto") == "endpoint"
    with pytest.raises(ValueError, match="for one-step students"):
        resolve_loss(multistep, "teacher_forced")
    with pytest.raises(ValueError, match="loss must be one of"):
        resolve_loss(one_step, "l1")
    # endpoint = the final point's error of the rollout; trajectory adds every grid point
    eps_fn = mixture()
    x = SDE.prior_sample(jax.random.PRNGKey(6), (3, 8), jnp.float64)
    params = {"r_logit": jnp.full(multistep.num_steps, 0.2),
              "c_logit": jnp.zeros(multistep.num_steps)}  # fmt: skip
    out, states = sample(multistep, eps_fn, x, trajectory=True,
                         rule_params=RuleParams.for_plan(multistep, params))  # fmt: skip
    targets = jnp.zeros((3, multistep.num_steps, 8))
    np.testing.assert_allclose(per_sample_loss(multistep, params, eps_fn, x, targets, "endpoint"),
                               np.mean(np.asarray(out) ** 2, axis=1), rtol=1e-12)  # fmt: skip
    np.testing.assert_allclose(
        per_sample_loss(multistep, params, eps_fn, x, targets, "trajectory"),
        np.sum(np.mean(np.asarray(states[1:]) ** 2, axis=2), axis=0), rtol=1e-12,
    )  # fmt: skip


@pytest.mark.parametrize(
    "name, cells",
    [("amed_gmm", 48), ("amed_digits", 24), ("amed_cifar10", 24), ("amed_cifar10:edm", 24)],
)
def test_amed_configs_validate(name, cells):
    """The shipped AMED configs validate and lay out their cells (AMED methods: default +
    amed; the others: default + the grid fits)."""
    import importlib

    module, _, arg = name.partition(":")
    get_config = importlib.import_module(f"configs.{module}").get_config
    config = get_config(arg) if arg else get_config()
    plan = get_mode("fit").validate(config)
    assert len(plan.cells) == cells
    assert {c.payload[3] for c in plan.cells if c.payload[1].method.startswith("amed")} == {
        "default", "amed"}  # fmt: skip


def test_sharded_sampling_uses_the_predictor():
    """``--mode=sample`` generates through ``sharded.shard_sampler``: the predictor's
    parameters travel with the network as a replicated argument."""
    from deis_jax.common import parallel
    from deis_jax.sampling import sharded
    from deis_jax.sampling.sampler import Sampler

    plan = make_plan(SDE, method="amed_ipndm", nfe=5, afs=True, predictor="stepwise")
    params = {"r_logit": jnp.linspace(-1.0, 1.0, plan.num_steps),
              "c_logit": jnp.full(plan.num_steps, 0.5)}  # fmt: skip
    params = RuleParams.for_plan(plan, params)
    eps_fn, x = mixture(), SDE.prior_sample(jax.random.PRNGKey(7), (4, 8), jnp.float64)
    fn = sharded.shard_sampler(Sampler(plan, eps_fn, params), parallel.make_mesh())
    want = sample(plan, eps_fn, x, rule_params=params)
    np.testing.assert_allclose(fn(x), want, rtol=1e-13, atol=1e-14)
    assert np.max(np.abs(want - sample(plan, eps_fn, x))) > 1e-3  # the predictor mattered


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
        resumed = fit_amed(plan, eps_fn, teacher, state_path=state, **kwargs)
        assert resumed.loop.resumed_step == 4
        # a finished fit read back reports the training time it took, not the read's
        seconds = [f.predictor.provenance["seconds"] for f in (full, resumed)]
        assert seconds[1] >= resumed.loop.seconds >= full.loop.seconds > 0
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
