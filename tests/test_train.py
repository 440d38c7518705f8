"""Training: the loss goes down, a killed run resumes identically, 8 devices == 1 device.

Uses a tiny Flax conv net (injected into ``deis_jax.experiments.train.run``) on the embedded
digits at 8x8, so nothing here depends on the NCSN++ code or on downloads. Run as a script,
this file prints the per-step losses of a short run (used for the multi-device comparison).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from damage import Killed, damaged_copies, flip_bit, largest_file, truncate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from deis_jax.common import checkpoint_store, data  # noqa: E402
from deis_jax.common.parallel import simulated_device_flags  # noqa: E402
from deis_jax.experiments import train as train_mode  # noqa: E402
from deis_jax.sampling import sde  # noqa: E402
from deis_jax.sampling.wrappers import eps_fn_from_model  # noqa: E402
from deis_jax.training import loop as training  # noqa: E402
from deis_jax.training import losses  # noqa: E402


@pytest.fixture(autouse=True)
def _fast_compiles():
    """These tests are about training logic, not speed: skip most XLA optimisations."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


class TinyNet(nn.Module):
    """Two-conv eps network with a time embedding and dropout (exercises the dropout rng)."""

    features: int = 16

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        freqs = jnp.exp(jnp.linspace(0.0, -6.0, 8))
        emb = labels[:, None] * freqs[None]
        emb = nn.Dense(self.features)(jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], -1))
        h = nn.swish(nn.Conv(self.features, (3, 3))(x) + emb[:, None, None, :])
        h = nn.Dropout(0.1, deterministic=not train)(h)
        h = nn.swish(nn.Conv(self.features, (3, 3))(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)


def tiny_config(n_iters: int = 6, batch_size: int = 8):
    from configs.vpsde_digits import get_config

    config = get_config()
    config.data.image_size = 8
    config.training.batch_size = batch_size
    config.training.n_iters = n_iters
    config.training.log_every = 1
    config.training.checkpoint_every = 3
    config.training.lr = 1e-3
    config.training.warmup = 2
    config.training.ema_rate = 0.9
    return config


def run_losses(config, workdir, callback_extra=None):
    """Train with TinyNet; returns {step: loss} recorded by the per-step callback."""
    recorded = {}

    def callback(step, metrics):
        recorded[step] = metrics["loss"]
        if callback_extra is not None:
            callback_extra(step)

    state, _ = train_mode.run(config, str(workdir), model=TinyNet(), callback=callback)
    return recorded, state


@pytest.mark.parametrize(
    "schedule",
    [sde.VPSDE.linear(), sde.SubVPSDE(), sde.VESDE(sigma_min=0.01, sigma_max=50.0)],
    ids=["vp", "subvp", "ve"],
)
@pytest.mark.parametrize("prediction", ["eps", "score"])
def test_dsm_loss_vanishes_for_the_exact_model(schedule, prediction):
    """Data x0 = 0: the exact eps is x_t / sigma(t) (score -x_t / sigma^2), so loss = 0."""
    x0 = jnp.zeros((16, 4, 4, 1))

    def apply(x, labels, key):  # conditioned on model_time, as a network would be
        t = schedule.t_from_rho(labels) if isinstance(schedule, sde.VESDE) else labels / 999.0
        sigma = schedule.sigma(t)[:, None, None, None]
        return x / sigma if prediction == "eps" else -x / sigma**2

    eps_model = eps_fn_from_model(apply, schedule, prediction)
    for weighting in (False, True):
        loss, per_example = losses.dsm_loss(
            eps_model, schedule, x0, jax.random.PRNGKey(0), likelihood_weighting=weighting
        )
        assert per_example.shape == (16,)
        assert float(loss) < 1e-6
    wrong = eps_fn_from_model(lambda x, labels, key: 0 * x, schedule, "eps")
    loss, _ = losses.dsm_loss(wrong, schedule, x0, jax.random.PRNGKey(0), reduce_mean=True)
    assert abs(float(loss) - 1.0) < 0.15  # E z^2 = 1
    loss_sum, _ = losses.dsm_loss(wrong, schedule, x0, jax.random.PRNGKey(0), reduce_mean=False)
    np.testing.assert_allclose(float(loss_sum), 0.5 * 16 * float(loss), rtol=1e-5)


def test_diffusion_coefficient_matches_score_sde():
    t = jnp.linspace(0.01, 1.0, 7)
    vp = sde.VPSDE.linear(0.1, 20.0)
    beta = 0.1 + t * 19.9
    np.testing.assert_allclose(losses.diffusion_squared(vp, t), beta, rtol=1e-4)
    sub = sde.SubVPSDE(beta_min=0.1, beta_max=20.0)
    integral = 0.1 * t + 0.5 * 19.9 * t**2
    expected = beta * (1.0 - jnp.exp(-2.0 * integral))
    np.testing.assert_allclose(losses.diffusion_squared(sub, t), expected, rtol=1e-4)
    ve = sde.VESDE(sigma_min=0.01, sigma_max=50.0)
    sigma = 0.01 * (50.0 / 0.01) ** t
    expected = sigma**2 * 2.0 * np.log(50.0 / 0.01)
    np.testing.assert_allclose(losses.diffusion_squared(ve, t), expected, rtol=1e-4)


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    schedule = sde.VPSDE.linear()
    model = TinyNet()
    tx = training.make_optimizer(lr=3e-3, warmup=0, grad_clip=1.0)
    state = training.init_state(model, tx, jax.random.PRNGKey(0), (8, 8, 1))
    batch = jnp.asarray(data.digits_images(8)[:16].astype(np.float32) / 127.5 - 1.0)
    step = jax.jit(
        training.make_train_step(model, schedule, tx, prediction="eps", seed=0, ema_rate=0.5)
    )

    def eval_loss(params):  # fixed key: the same t and z before and after training
        eps_model = eps_fn_from_model(
            training.apply_fn(model, params, train=False), schedule, "eps"
        )
        return float(losses.dsm_loss(eps_model, schedule, batch, jax.random.PRNGKey(7))[0])

    before = eval_loss(state.params)
    for _ in range(40):
        state, metrics = step(state, batch)
    assert int(state.step) == 40
    assert np.isfinite(float(metrics["loss"]))
    after = eval_loss(state.params)
    assert after < 0.8 * before, (before, after)
    # EMA tracks the parameters (rate 0.5: close to the last iterate, not the init).
    ema_loss = eval_loss(state.ema_params)
    assert ema_loss < 0.9 * before


def test_resume_after_a_kill_continues_identically(tmp_path):
    config = tiny_config(n_iters=6)
    reference, ref_state = run_losses(config, tmp_path / "uninterrupted")
    assert sorted(reference) == list(range(6))

    class Killed(RuntimeError):
        pass

    def kill_at_4(step):
        if step == 4:  # after the checkpoint at 3 updates, before the one at 6
            raise Killed

    with pytest.raises(Killed):
        run_losses(config, tmp_path / "killed", kill_at_4)
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["3"]

    resumed, state = run_losses(config, tmp_path / "killed")
    assert sorted(resumed) == [3, 4, 5]  # restarted from the checkpoint, not from 0
    for s in resumed:
        assert resumed[s] == reference[s], (s, resumed[s], reference[s])
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _losses_on_devices(n: int, workdir) -> list[float]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = simulated_device_flags(os.environ.get("XLA_FLAGS"), n)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == n
    return result["losses"]


def test_eight_devices_match_one_device(tmp_path):
    one = _losses_on_devices(1, tmp_path / "d1")
    eight = _losses_on_devices(8, tmp_path / "d8")
    assert len(one) == len(eight) == 5
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":  # one short run; prints {"devices": n, "losses": [...]}
    cfg = tiny_config(n_iters=5, batch_size=16)
    cfg.training.checkpoint_every = 100
    got, _ = run_losses(cfg, sys.argv[1])
    print(json.dumps({"devices": jax.device_count(), "losses": [got[s] for s in sorted(got)]}))


# --- killed, damaged and refused runs and checkpoints ---------------------------------------


def tiny_train_config():
    config = tiny_config(n_iters=4)
    config.training.checkpoint_every = 2  # checkpoints 2 and 4, a record every step
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted 4-step run: (workdir, final state, metrics records)."""
    workdir = str(tmp_path_factory.mktemp("train") / "uninterrupted")
    state, history = train_mode.run(tiny_train_config(), workdir, model=TinyNet())
    return workdir, state, history


def logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, f)]


def test_train_killed_mid_run_resumes_to_the_uninterrupted_result(trained, tmp_path):
    """Killed in step 4, after the record of step 3 and the checkpoint at step 2: the restart
    drops that record, redoes steps 3 and 4, and ends where the uninterrupted run ended."""
    reference, ref_state, _ = trained
    workdir = str(tmp_path / "killed")

    def kill(step, metrics):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_mode.run(tiny_train_config(), workdir, model=TinyNet(), callback=kill)
    assert [s for s, _, _ in logged(workdir)] == [1, 2, 3]
    state, _ = train_mode.run(tiny_train_config(), workdir, model=TinyNet())
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert logged(workdir) == logged(reference)


def test_train_resumes_from_the_newest_intact_checkpoint(trained, tmp_path, caplog):
    """A bit flip in the newest checkpoint (orbax would restore it silently): it is moved
    aside, training resumes from step 2, logs steps 3 and 4 once, and ends bit for bit where
    the uninterrupted run ended."""
    reference, ref_state, _ = trained
    workdir = str(tmp_path / "damaged")
    shutil.copytree(reference, workdir)
    newest = os.path.join(workdir, "checkpoints", "4")
    flip_bit(largest_file(os.path.join(newest, "default")))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "lo')  # and a record torn by the kill
    with caplog.at_level(logging.WARNING):
        state, history = train_mode.run(tiny_train_config(), workdir, model=TinyNet())
    assert f"checkpoint step 4 ({newest}) is damaged" in caplog.text
    assert "does not match its recorded sha256" in caplog.text
    assert [h["step"] for h in history] == [3, 4] and damaged_copies(newest)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert logged(workdir) == logged(reference)  # one record per step, the same values


def test_training_stops_at_a_nonfinite_loss_before_logging_or_checkpointing_it(tmp_path):
    def step_fn(state, batch):  # the loss turns NaN at the third step
        return state, {"loss": jnp.where(batch >= 2, jnp.nan, 1.0), "grad_norm": jnp.ones(())}

    state = training.TrainState(jnp.zeros((), jnp.int32), None, None, None)
    metrics = str(tmp_path / "metrics.jsonl")
    with pytest.raises(
        training.TrainingDivergedError, match="training diverged: mean .*'loss': nan.* step 4"
    ):
        training.train_loop(state, step_fn, iter(jnp.arange(6)), num_steps=6, log_every=2,
                            metrics_path=metrics)  # fmt: skip
    assert [json.loads(x)["step"] for x in open(metrics)] == [2]  # no NaN record


def _abstract_state(config):
    tx = training.optimizer_from_config(config.training)
    return jax.eval_shape(lambda: training.init_state(TinyNet(), tx, jax.random.PRNGKey(0),
                                                      (8, 8, 1)))  # fmt: skip


def _data_file(step_dir):
    return largest_file(os.path.join(step_dir, "default"))


CHECKPOINT_DAMAGE = {
    "truncated": (lambda d: truncate(_data_file(d)), "does not match its recorded sha256"),
    "deleted": (lambda d: os.remove(_data_file(d)), "is missing"),
    "torn_record": (
        lambda d: truncate(os.path.join(d, checkpoint_store.INTEGRITY_FILE)),
        "unreadable",
    ),
    "no_record": (  # no digests to check against: orbax's own error decides (a truncated
        # data file may go unnoticed by orbax: it can hold superseded blocks)
        lambda d: (
            os.remove(os.path.join(d, checkpoint_store.INTEGRITY_FILE)),
            truncate(os.path.join(d, "default", "_METADATA")),
        ),
        "restoring it failed (JSONDecodeError",
    ),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_falls_back_with_a_warning(trained, tmp_path, caplog, name):
    reference = os.path.join(trained[0], "checkpoints")
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(reference, directory)
    damage, message = CHECKPOINT_DAMAGE[name]
    damage(os.path.join(directory, "4"))
    target = _abstract_state(tiny_train_config())
    with caplog.at_level(logging.WARNING):
        mngr = checkpoint_store.checkpoint_manager(directory)
        try:
            state = checkpoint_store.restore_state(mngr, target)
            assert mngr.all_steps() == [2]
        finally:
            mngr.close()
    assert int(state.step) == 2
    assert f"checkpoint step 4 ({os.path.join(directory, '4')}) is damaged" in caplog.text
    assert message in caplog.text
    pristine = checkpoint_store.checkpoint_manager(reference)
    try:
        expected = checkpoint_store.restore_state(pristine, target, step=2)
    finally:
        pristine.close()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_intact_checkpoint_or_another_runs_checkpoint_is_refused(trained, tmp_path):
    config = tiny_train_config()
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(trained[0], "checkpoints"), directory)
    target = _abstract_state(config)
    other = tiny_train_config()
    other.seed = 1  # the checkpoints of another run
    mngr = checkpoint_store.checkpoint_manager(directory)
    try:
        with pytest.raises(
            checkpoint_store.CheckpointError, match=r"another run \(seed: 0 \(on disk\) vs 1"
        ):
            checkpoint_store.restore_state(mngr, target, identity=train_mode.identity(other))
        for step in ("2", "4"):
            flip_bit(_data_file(os.path.join(directory, step)))
        with pytest.raises(checkpoint_store.CheckpointError) as info:
            checkpoint_store.restore_state(mngr, target, identity=train_mode.identity(config))
    finally:
        mngr.close()
    message = str(info.value)
    assert f"no checkpoint in {directory} can be restored" in message
    assert "step 4: file" in message and "step 2: file" in message
    assert sorted(os.listdir(directory)) == ["2", "4"]  # nothing moved: nothing to fall back to
