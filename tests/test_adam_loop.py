"""The shared Adam loop (``deis_jax.fitting.adam_loop``) on a tiny quadratic problem: descent,
best-validation parameters, skipped non-finite updates, early stopping, and bitwise resume."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deis_jax.fitting.adam_loop import ExtraState, LoopResult, fit_adam

RNG = np.random.default_rng(0)
TRAIN = RNG.normal(loc=2.0, size=(32, 3))
VAL = RNG.normal(loc=2.0, size=(16, 3))
INIT = {"w": jnp.zeros(3)}


def quadratic(w, rows):
    return jnp.mean(jnp.sum((w - rows) ** 2, axis=1))


_value_and_grad = jax.jit(jax.value_and_grad(lambda p, rows: quadratic(p["w"], rows)))


def loss_and_grads(params, idx):
    loss, grads = _value_and_grad(params, TRAIN[idx])
    return loss, len(idx), grads


def val_loss(params):
    return float(quadratic(params["w"], VAL))


def fit(**kwargs):
    kwargs = {"steps": 20, "learning_rate": 0.1, "batch_size": 8, **kwargs}
    return fit_adam(loss_and_grads, val_loss, INIT, len(TRAIN), **kwargs)


def test_loop_descends_and_returns_the_best_validation_params():
    calls, hooks, ticks = [], [], []
    result = fit(steps=60, eval_every=2, callback=lambda *a: calls.append(a),
                 after_update=lambda *a: hooks.append(a), progress=ticks.append)  # fmt: skip
    assert isinstance(result, LoopResult) and result.resumed_step == 0
    assert result.skipped_steps == 0 and len(result.train_loss) == 60
    assert len(result.val_loss) == 30
    assert result.best_val_loss < 0.5 * result.init_val_loss
    assert result.init_val_loss == val_loss(INIT)
    assert result.best_val_loss == min([result.init_val_loss, *result.val_loss])
    assert result.best_val_loss == val_loss(result.params)
    assert result.best_step == 2 * (1 + int(np.argmin(result.val_loss)))
    assert [c[0] for c in calls] == list(range(60))
    assert [c[2] is None for c in calls] == [True, False] * 30
    assert [h[0] for h in hooks] == list(range(60)) and all(h[2] == 8 for h in hooks)
    assert all(len(h[1]) == 8 for h in hooks) and ticks == [1] * 60


def test_non_finite_loss_is_skipped_and_counted(caplog):
    calls = []

    def poisoned(params, idx):
        calls.append(None)
        loss, aux, grads = loss_and_grads(params, idx)
        if len(calls) == 4:  # update 3
            return jnp.nan, aux, grads
        if len(calls) == 6:  # update 5: a finite loss with a NaN gradient
            return loss, aux, jax.tree.map(lambda g: g * jnp.nan, grads)
        return loss, aux, grads

    hooks = []
    with caplog.at_level(logging.WARNING):
        result = fit_adam(poisoned, val_loss, INIT, len(TRAIN), steps=10, learning_rate=0.1,
                          after_update=lambda k, *_: hooks.append(k))  # fmt: skip
    assert result.skipped_steps == 2
    assert np.isnan(result.train_loss[3]) and np.isnan(result.train_loss[5])
    assert np.all(np.isfinite(np.delete(result.train_loss, [3, 5])))
    assert hooks == [0, 1, 2, 4, 6, 7, 8, 9]
    assert "step 3: non-finite" in caplog.text and "step 5: non-finite" in caplog.text
    assert np.all(np.isfinite(result.params["w"]))


def test_patience_stops_early():
    # a learning rate far too large: the validation loss never beats the init
    result = fit(steps=50, learning_rate=50.0, patience=4)
    assert len(result.train_loss) == 4 and len(result.val_loss) == 4
    assert result.best_step == 0 and result.best_val_loss == result.init_val_loss
    np.testing.assert_array_equal(result.params["w"], INIT["w"])


def test_non_finite_initial_validation_loss_is_refused():
    with pytest.raises(ValueError, match="not finite"):
        fit_adam(loss_and_grads, lambda p: float("nan"), INIT, len(TRAIN), steps=3,
                 learning_rate=0.1)  # fmt: skip


class Kill(Exception):
    pass


def kill_at(step):
    def callback(k, *_):
        if k == step:
            raise Kill

    return callback


def assert_same(a: LoopResult, b: LoopResult):
    np.testing.assert_array_equal(a.params["w"], b.params["w"])
    np.testing.assert_array_equal(a.train_loss, b.train_loss)
    assert a.val_loss == b.val_loss and a.best_step == b.best_step
    assert a.best_val_loss == b.best_val_loss and a.init_val_loss == b.init_val_loss
    assert a.skipped_steps == b.skipped_steps


def test_resume_after_a_kill_and_after_more_steps_is_bitwise_uninterrupted(tmp_path):
    path = str(tmp_path / "state.msgpack")
    reference = fit(steps=20)
    # killed during update 7, after the checkpoint of update 6 (checkpoint_every=3)
    with pytest.raises(Kill):
        fit(steps=20, state_path=path, checkpoint_every=3, callback=kill_at(7))
    ticks = []
    resumed = fit(steps=20, state_path=path, checkpoint_every=3, progress=ticks.append)
    assert resumed.resumed_step == 6 and ticks == [6] + [1] * 14
    assert_same(resumed, reference)
    # a finished 10-step fit continues to 20 steps
    path10 = str(tmp_path / "state10.msgpack")
    first = fit(steps=10, state_path=path10, checkpoint_every=3)
    assert first.resumed_step == 0 and len(first.train_loss) == 10
    continued = fit(steps=20, state_path=path10, checkpoint_every=3)
    assert continued.resumed_step == 10
    assert_same(continued, reference)
    # rerunning a finished fit returns its result without updating
    again = fit(steps=20, state_path=path10)
    assert again.resumed_step == 20
    assert_same(again, reference)


def test_resume_restores_the_callers_extra_state(tmp_path):
    """A stateful ``after_update`` (like LD3's soft teacher) resumes bitwise with
    ``extra_state``."""

    def run(path, callback=None):
        memory = {"shift": np.zeros(3), "lr": 1.0}

        def shifted(params, idx):
            return loss_and_grads({"w": params["w"] + memory["shift"]}, idx)

        def after_update(k, idx, aux, params):
            memory["shift"] = memory["shift"] + 0.01 * memory["lr"] * np.asarray(params["w"])
            memory["lr"] *= 0.9

        def set_state(state):
            memory["shift"], memory["lr"] = np.array(state["shift"]), float(state["lr"])

        extra = ExtraState(get=lambda: dict(memory), set=set_state)
        result = fit(steps=12, state_path=path, checkpoint_every=4, after_update=after_update,
                     extra_state=extra, callback=callback)  # fmt: skip
        return result, memory

    reference, ref_memory = run(None)
    path = str(tmp_path / "state")
    with pytest.raises(Kill):
        run(path, callback=kill_at(9))
    resumed, memory = run(path)
    assert resumed.resumed_step == 8
    assert_same(resumed, reference)
    np.testing.assert_array_equal(memory["shift"], ref_memory["shift"])
    assert memory["lr"] == ref_memory["lr"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped"])
def test_corrupt_state_is_ignored_with_a_warning(tmp_path, caplog, damage):
    path = tmp_path / "state"
    fit(steps=10, state_path=str(path))
    data = path.read_bytes()
    if damage == "garbage":
        data = b"\x00\xffnot a state file" * 7
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data[:-20] + bytes([data[-20] ^ 1]) + data[-19:]
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING):
        result = fit(steps=20, state_path=str(path))
    assert "ignoring the unreadable training state" in caplog.text
    assert result.resumed_step == 0
    assert_same(result, fit(steps=20))
    assert fit(steps=20, state_path=str(path)).resumed_step == 20  # rewritten, valid again


def test_other_fingerprint_or_settings_are_not_resumed(tmp_path, caplog):
    path = str(tmp_path / "state")
    fit(steps=10, state_path=path, state_fingerprint="model A")
    with caplog.at_level(logging.WARNING):
        other = fit(steps=20, state_path=path, state_fingerprint="model B")
    assert other.resumed_step == 0 and "not 'model B'" in caplog.text
    assert_same(other, fit(steps=20))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        changed = fit(steps=20, state_path=path, state_fingerprint="model B", learning_rate=0.2)
    assert changed.resumed_step == 0 and "settings" in caplog.text
    # more updates saved than asked for: start over (a shorter fit cannot be reproduced)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        shorter = fit(steps=5, state_path=path, state_fingerprint="model B", learning_rate=0.2)
    assert shorter.resumed_step == 0 and "more than the 5" in caplog.text
    # parameters of another shape under the same fingerprint: start over as well
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = fit_adam(lambda p, idx: (jnp.sum(p["w"] ** 2), None, {"w": 2 * p["w"]}),
                          lambda p: float(jnp.sum(p["w"] ** 2)) + 1.0, {"w": jnp.ones(4)},
                          len(TRAIN), steps=6, learning_rate=0.2, batch_size=8,
                          state_path=path, state_fingerprint="model B")  # fmt: skip
    assert result.resumed_step == 0 and "saved leaf 0 is float64[3]" in caplog.text
