"""LD3 (``deis_jax.fitting.ld3``): gradients through the sampler, the grid parametrisation, and
fits on exact-score Gaussian mixtures against accurate reference endpoints."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close_ulp

import deis_jax as deis
from deis_jax.evaluation.reference import reference_solve
from deis_jax.fitting import ld3
from deis_jax.sampling.learned import corrected_table
from deis_jax.sampling.sampler import make_plan, sample
from deis_jax.sampling.wrappers import model_argument

SDE = deis.VPSDE.linear()
RING = deis.GaussianMixture.ring()
F = model_argument(RING.eps_fn(SDE))

IPNDM3 = make_plan(SDE, method="ipndm", order=3, nfe=4)  # module plans share compiled losses
DDIM2 = make_plan(SDE, method="ddim", nfe=2)
RUN = jax.jit(sample, static_argnums=0)

# Every deterministic method. Those marked slow add no code path to the others (to keep the
# default run short): the lower multistep orders are the warm-up rows of tab3 / dpmpp3 /
# unipc3, rhoab3 is tab3's builder in another basis, Heun is rk4's builder with another
# tableau. dpmpp3 and unipc3 use NFE 6 so that their order-3 rows occur.
SWEEP = {
    "ddim": DDIM2,
    "tab3": make_plan(SDE, method="tab", order=3, nfe=4),
    "ipndm3": IPNDM3,
    "rhork-rk4": make_plan(SDE, method="rhork", order=4, nfe=8, tableau="rk4"),
    "dpmpp3": make_plan(SDE, method="dpmpp", order=3, nfe=6),
    "unipc3": make_plan(SDE, method="unipc", order=3, nfe=6),
    "tab1": make_plan(SDE, method="tab", order=1, nfe=4),
    "tab2": make_plan(SDE, method="tab", order=2, nfe=4),
    "rhoab3": make_plan(SDE, method="rhoab", order=3, nfe=4),
    "rhork-heun": make_plan(SDE, method="rhork", order=2, nfe=6, tableau="heun"),
    "dpmpp2": make_plan(SDE, method="dpmpp", order=2, nfe=4),
    "unipc2": make_plan(SDE, method="unipc", order=2, nfe=4),
}
SLOW = {"tab1", "tab2", "rhoab3", "rhork-heun", "dpmpp2", "unipc2"}


@pytest.fixture(scope="module")
def teacher():
    """256 starting points on the ring and their reference endpoints over [1e-3, 1]."""
    x_T = jax.random.normal(jax.random.PRNGKey(0), (256, 2), jnp.float64)
    ref = reference_solve(SDE, F, x_T, t0=1e-3, t1=1.0, steps=100)
    assert ref.error_estimate < 1e-6
    return np.asarray(x_T), ref.x0


# --- (a) gradients through the grid, the table builder and the scan -------------------------


@pytest.mark.parametrize(
    "name", [pytest.param(k, marks=[pytest.mark.slow] if k in SLOW else []) for k in SWEEP]
)
def test_grid_gradient_matches_finite_differences(name, teacher):
    """``jax.grad`` of LD3's loss in the grid logits -- through ``grid_from_params``,
    ``plan.build_table`` (traced) and ``sample(..., table=...)`` -- against central differences.
    (The logits move the interior grid points smoothly, so this checks d loss / d ts too.)"""
    plan = SWEEP[name]
    n = {id(IPNDM3): 128, id(DDIM2): 64}.get(id(plan), 8)  # the shapes the fits below use
    x_T, x0 = teacher[0][:n], teacher[1][:n]

    def loss(theta):
        (value, _), (grads, _) = ld3._loss_and_grads(
            plan, 0.1, "mse", ld3.DEFAULT_TRIM, False, {"theta": jnp.asarray(theta)}, F, x_T, x0
        )
        return float(value), np.asarray(grads["theta"])

    theta = ld3.init_theta(plan)
    value, grad = loss(theta)
    assert value > 0 and np.max(np.abs(grad)) > 0
    h = 1e-5
    fd = np.array(
        [(loss(theta + h * e)[0] - loss(theta - h * e)[0]) / (2 * h) for e in np.eye(len(theta))]
    )
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6 * np.max(np.abs(fd)))


# --- (b) the grid parametrisation -----------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize(
    "schedule,grid",
    [(SDE, "quadratic"), (SDE, "log_snr"), (SDE, "time"), (deis.VPSDE.cosine(), "quadratic")],
)
def test_init_theta_reproduces_the_plan_grid(schedule, grid):
    plan = make_plan(schedule, method="tab", order=3, nfe=7, grid=grid)
    theta = ld3.init_theta(plan)
    ts = ld3.grid_from_params(plan, theta)
    assert isinstance(ts, np.ndarray) and ts.dtype == np.float64
    np.testing.assert_allclose(ts, plan.ts, rtol=1e-12, atol=0)
    assert ts[0] == plan.ts[0] and ts[-1] == plan.ts[-1]
    traced = jax.jit(lambda th: ld3.grid_from_params(plan, th))(jnp.asarray(theta))
    np.testing.assert_allclose(np.asarray(traced), plan.ts, rtol=1e-12, atol=0)


@pytest.mark.numerics
def test_any_logits_give_a_strictly_decreasing_grid_with_exact_ends():
    plan = make_plan(SDE, method="ipndm", order=3, nfe=6)
    theta = 3.0 * np.random.default_rng(0).normal(size=plan.num_steps)
    ts = ld3.grid_from_params(plan, theta)
    assert np.all(np.diff(ts) < 0)
    assert ts[0] == plan.ts[0] and ts[-1] == plan.ts[-1]
    np.testing.assert_allclose(ld3.grid_from_params(plan, theta + 5.0), ts, rtol=1e-13)


def test_stochastic_plans_are_refused():
    plan = make_plan(SDE, method="sddim", nfe=4, lam=1.0)
    x = np.zeros((2, 2))
    with pytest.raises(ValueError, match="sddim"):
        ld3.fit_ld3(plan, F, x, x, x, x, steps=1)


# --- (c) a problem whose best grid is known by brute force ----------------------------------


@pytest.mark.numerics
def test_ddim_two_steps_finds_the_brute_force_optimum(teacher):
    """DDIM with 2 steps has one interior point, at half-log-SNR lambda_0 + u (lambda_2 -
    lambda_0); the loss is scanned over u with ordinary host-built plans and LD3 must land on
    the argmin."""
    x_T, x0 = teacher[0][:64], teacher[1][:64]
    plan = DDIM2
    result = ld3.fit_ld3(plan, F, x_T, x0, x_T, x0, loss="mse", steps=300, learning_rate=0.02)
    lam = ld3.half_log_snr(plan)

    def loss(u):
        t = float(SDE.t_from_log_snr(2.0 * (lam[0] + u * (lam[-1] - lam[0]))))
        table = make_plan(SDE, [plan.ts[0], t, plan.ts[-1]], method="ddim").table
        out = RUN(plan, F, jnp.asarray(x_T), table=table)
        return float(np.mean((np.asarray(out) - x0) ** 2))

    coarse = np.linspace(0.01, 0.99, 99)
    u0 = coarse[np.argmin([loss(u) for u in coarse])]
    fine = np.linspace(u0 - 0.01, u0 + 0.01, 81)
    losses = [loss(u) for u in fine]
    u_best = fine[np.argmin(losses)]
    u_fit = (0.5 * SDE.log_snr(result.ts[1]) - lam[0]) / (lam[-1] - lam[0])
    assert abs(u_fit - u_best) < 2e-3, (u_fit, u_best)
    assert result.best_val_loss <= min(losses) * (1 + 1e-4)
    assert result.best_val_loss < 0.5 * result.init_val_loss


# --- (d), (e) fits on the ring: validation and held-out improvement --------------------------


@pytest.fixture(scope="module")
def ring_fits(teacher):
    x_T, x0 = teacher
    split = {"train": slice(0, 128), "val": slice(128, 192), "test": slice(192, 256)}
    data = {k: (x_T[s], x0[s]) for k, s in split.items()}
    plan = IPNDM3
    fits = {
        learn: ld3.fit_ld3(plan, F, *data["train"], *data["val"], learn_table=learn, steps=150)
        for learn in (False, True)
    }
    return plan, data, fits


def held_out_mse(plan, theta, raw, data):
    """Held-out RMSE^2 of the grid of logits ``theta`` (and corrections ``raw``) on fresh x_T."""
    params = {"theta": jnp.asarray(theta)}
    if raw is not None:
        params["raw"] = jnp.asarray(raw)
    return float(jnp.mean(ld3._per_sample_loss_jit(plan, 0.1, params, F, *data["test"])))


def host_mse(table, data):
    """Held-out RMSE^2 of ``sample`` run with a host (numpy float64) table of IPNDM3's shape."""
    out = RUN(IPNDM3, F, jnp.asarray(data["test"][0]), table=table)
    return float(np.mean((np.asarray(out) - data["test"][1]) ** 2))


@pytest.mark.numerics
def test_ld3_grid_beats_the_initial_grid_on_held_out_points(ring_fits):
    plan, data, fits = ring_fits
    result = fits[False]
    assert result.raw is None and result.skipped_steps == 0
    assert result.best_val_loss < 0.5 * result.init_val_loss
    assert result.best_val_loss == min([result.init_val_loss, *result.val_loss])
    assert np.all(np.diff(result.ts) < 0)
    assert result.ts[0] == plan.ts[0] and result.ts[-1] == plan.ts[-1]
    init = held_out_mse(plan, ld3.init_theta(plan), None, data)
    fitted = held_out_mse(plan, result.theta, None, data)
    assert fitted < 0.6 * init, (init, fitted)
    # the returned grid runs as an ordinary plan, with the same result
    table = make_plan(SDE, result.ts, method="ipndm", order=3).table
    np.testing.assert_allclose(host_mse(table, data), fitted, rtol=1e-9)


@pytest.mark.numerics
def test_learned_table_improves_on_grid_only(ring_fits):
    plan, data, fits = ring_fits
    grid_only, joint = fits[False], fits[True]
    assert joint.raw is not None and joint.raw.shape == (plan.num_steps, 1 + plan.table.history)
    assert np.all(np.isfinite(joint.raw)) and np.any(joint.raw != 0)
    assert joint.best_val_loss <= grid_only.best_val_loss
    fitted = held_out_mse(plan, joint.theta, joint.raw, data)
    assert fitted < held_out_mse(plan, ld3.init_theta(plan), None, data)
    # the host path (a plan on the fitted grid + corrected_table) gives the same result
    base = make_plan(SDE, joint.ts, method="ipndm", order=3).table
    np.testing.assert_allclose(host_mse(corrected_table(base, joint.raw, 0.1), data), fitted,
                               rtol=1e-9)  # fmt: skip


def test_training_is_reproducible_and_reports_progress(teacher):
    x_T, x0 = teacher
    plan = DDIM2
    calls = []
    kwargs = dict(steps=6, batch_size=64, seed=3, eval_every=2)  # shuffled halves of 128
    a = ld3.fit_ld3(plan, F, x_T[:128], x0[:128], x_T[:64], x0[:64],
                    callback=lambda *args: calls.append(args), **kwargs)  # fmt: skip
    b = ld3.fit_ld3(plan, F, x_T[:128], x0[:128], x_T[:64], x0[:64], **kwargs)
    np.testing.assert_array_equal(a.ts, b.ts)
    assert a.train_loss == b.train_loss and len(a.train_loss) == 6 and len(a.val_loss) == 3
    assert [c[0] for c in calls] == list(range(6))
    assert [c[2] is None for c in calls] == [True, False] * 3


@pytest.mark.numerics
def test_non_finite_steps_are_skipped(teacher):
    x_T, x0 = teacher
    plan = DDIM2
    bad = x0[:64].copy()
    bad[0] = np.nan  # a NaN teacher point poisons the training loss, not the validation
    result = ld3.fit_ld3(plan, F, x_T[:64], bad, x_T[:64], x0[:64], steps=3)
    assert result.skipped_steps == 3 and all(np.isnan(result.train_loss))
    # the logits are the initial ones, bit for bit (copies); their grid is the plan's up to
    # the float64 round trip exp / softmax / cumsum / t_from_log_snr (a few ulp; <= 13 ulp
    # measured on LD3's grids with numpy's AVX-512 and baseline kernels)
    np.testing.assert_array_equal(result.theta, ld3.init_theta(plan))
    assert_close_ulp(result.ts, plan.ts, ulps=32)
    assert result.best_step == 0 and result.best_val_loss == result.init_val_loss


@pytest.mark.numerics
def test_soft_teacher_moves_latents_within_the_ball_and_validates_on_originals(
    teacher, monkeypatch
):
    x_T, x0 = teacher
    plan = DDIM2
    teachers = []

    class Recording(ld3._SoftTeacher):
        def __init__(self, *args):
            super().__init__(*args)
            teachers.append(self)

    monkeypatch.setattr(ld3, "_SoftTeacher", Recording)
    ball = 0.05
    result = ld3.fit_ld3(plan, F, x_T[:64], x0[:64], x_T[:64], x0[:64], loss="mse", steps=30,
                         learning_rate=0.02, ball=ball)  # fmt: skip
    assert result.best_val_loss < result.init_val_loss
    (soft,) = teachers
    shift = np.linalg.norm(soft.moved - x_T[:64], axis=1)
    radius = ball * np.sqrt(2) / plan.num_steps**2
    assert np.all(shift <= radius * (1 + 1e-9)) and np.any(shift > 0.5 * radius)
    # validation is on the original latents: re-evaluating the best grid reproduces it
    theta = jnp.asarray(result.theta)
    val = jnp.mean(ld3._per_sample_loss_jit(plan, 0.1, {"theta": theta}, F, x_T[:64], x0[:64]))
    np.testing.assert_allclose(float(val), result.best_val_loss, rtol=1e-12)


def test_resumed_fit_equals_an_uninterrupted_one(teacher, tmp_path, caplog):
    """With ``state_path`` a finished fit continues to more steps -- minibatches, Adam and the
    soft teacher's latents restored -- bitwise like a fit run in one go (a constant rate: a
    decaying one depends on the number of steps, see the next test)."""
    x_T, x0 = teacher
    data = (x_T[:64], x0[:64], x_T[64:96], x0[64:96])
    kwargs = dict(learning_rate=0.02, final_lr_fraction=1.0, batch_size=24, ball=0.05,
                  learn_table=True, seed=1)  # fmt: skip
    reference = ld3.fit_ld3(DDIM2, F, *data, steps=16, **kwargs)
    path = str(tmp_path / "ld3.state")
    first = ld3.fit_ld3(DDIM2, F, *data, steps=7, state_path=path, state_fingerprint="ring",
                        **kwargs)  # fmt: skip
    assert len(first.train_loss) == 7
    with caplog.at_level(logging.INFO, logger="deis_jax.fitting.adam_loop"):
        resumed = ld3.fit_ld3(DDIM2, F, *data, steps=16, state_path=path,
                              state_fingerprint="ring", **kwargs)  # fmt: skip
    assert "resumed from" in caplog.text and "at update 7/16" in caplog.text
    for field in ("theta", "raw", "ts", "train_loss"):
        np.testing.assert_array_equal(getattr(resumed, field), getattr(reference, field))
    assert resumed.val_loss == reference.val_loss and resumed.best_step == reference.best_step
    # other data under the same fingerprint string: not resumed (the data are hashed)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        other = ld3.fit_ld3(DDIM2, F, x_T[:64], x0[:64], x_T[96:128], x0[96:128], steps=16,
                            state_path=path, state_fingerprint="ring", **kwargs)  # fmt: skip
    assert "ignoring the training state" in caplog.text
    assert other.val_loss != reference.val_loss


def test_killed_decaying_fit_resumes_to_the_uninterrupted_result(teacher, tmp_path):
    """The default, decaying rate: a fit killed at update 7 of 16 and run again with the same
    arguments ends bit for bit where an uninterrupted one does (the same compiled updates)."""
    x_T, x0 = teacher
    data = (x_T[:64], x0[:64], x_T[64:96], x0[64:96])
    kwargs = dict(steps=16, learning_rate=0.05, batch_size=24, learn_table=True, seed=2)
    reference = ld3.fit_ld3(DDIM2, F, *data, **kwargs)
    path = str(tmp_path / "ld3.state")

    def die(step, train, val):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ld3.fit_ld3(DDIM2, F, *data, state_path=path, state_fingerprint="ring", callback=die,
                    **kwargs)  # fmt: skip
    resumed = ld3.fit_ld3(DDIM2, F, *data, state_path=path, state_fingerprint="ring", **kwargs)
    for field in ("theta", "raw", "ts"):
        np.testing.assert_array_equal(getattr(resumed, field), getattr(reference, field))
    assert resumed.val_loss == reference.val_loss


def test_a_fit_that_does_not_improve_says_so(teacher):
    """A learning rate so small that no update changes the validation loss's first digits --
    and one of 0 steps -- returns the initial grid with ``improved`` False and a warning
    naming the plan."""
    x_T, x0 = teacher
    with pytest.warns(ld3.NoFitWarning, match=r"LD3 did not improve the validation loss of "
                      r"ddim order 0 at NFE 2 in 0 updates \(rms .* at the init\): the "
                      r"initial grid is returned"):  # fmt: skip
        result = ld3.fit_ld3(DDIM2, F, x_T[:32], x0[:32], x_T[32:64], x0[32:64], steps=0)
    assert not result.improved and result.best_step == 0
    np.testing.assert_array_equal(result.theta, ld3.init_theta(DDIM2))
    improving = ld3.fit_ld3(DDIM2, F, x_T[:32], x0[:32], x_T[32:64], x0[32:64], steps=20)
    assert improving.improved and improving.best_val_loss < improving.init_val_loss


@pytest.mark.parametrize("loss", ld3.LOSSES)
def test_losses_reduce_per_sample_distances_as_documented(loss):
    d = np.array([0.1, 0.2, 0.3, 0.4, 5.0, 0.05, 0.15, 0.25, 0.35, 0.45])
    got = float(ld3.reduce_losses(jnp.asarray(d**2), loss, trim=0.1))
    want = {"mse": np.mean(d**2), "rms": np.mean(d), "trimmed_rms": np.mean(np.sort(d)[:9])}
    # sqrt(d^2 + tiny) differs from d by far less than an ulp of these values
    np.testing.assert_allclose(got, want[loss], rtol=4 * np.finfo(np.float64).eps)
