"""Fitting on a class-conditional network: every starting point's class reaches every network
call of its trajectory -- the teacher's, the fits' (through minibatches and EPD's one call
on the K·B concatenated probes) and the held-out measurement's -- and ``--mode=fit`` runs
``configs/epd_imagenet64.py`` end to end on a tiny random class-conditional EDM network.

The analytic oracle: class-conditional Gaussian data ``x0 ~ N(mu_c, s^2 I)`` under a VP
schedule, whose exact eps is ``sigma (x - alpha mu_c) / (alpha^2 s^2 + sigma^2)`` and whose
probability-flow ODE keeps ``(x_t - alpha_t mu_c) / sqrt(alpha_t^2 s^2 + sigma_t^2)`` fixed.
The class means are far apart, so a row that got another row's class is off by O(1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deis_jax.fitting import teacher as teacher_module
from deis_jax.fitting.amed import amed_teacher, fit_amed
from deis_jax.fitting.optimize import endpoint_distances, optimize_grid
from deis_jax.fitting.teacher import load_or_solve_teacher, load_teacher, solve_teacher
from deis_jax.sampling.rule_params import RuleParams
from deis_jax.sampling.sampler import make_plan, run_table, sample
from deis_jax.sampling.sde import VPSDE
from deis_jax.sampling.wrappers import per_sample_time

SDE = VPSDE()
DIM, CLASSES, SPREAD = 8, 4, 1.0
MEANS = 6.0 * np.eye(CLASSES, DIM)  # |mu_a - mu_b|^2 / D = 9 between classes


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def conditional_eps(x, t, labels=None):
    """The exact eps of the class-conditional Gaussians (scalar or per-row ``t``)."""
    if labels is None:
        raise ValueError("a class-conditional model needs labels")
    t = jnp.asarray(t)
    alpha, sigma = SDE.alpha(t), SDE.sigma(t)
    if t.ndim == 1:
        alpha, sigma = alpha[:, None], sigma[:, None]
    mu = jnp.asarray(MEANS, x.dtype)[labels]
    return sigma * (x - alpha * mu) / (alpha**2 * SPREAD**2 + sigma**2)


def exact_x0(x_T, labels, t0, t1):
    mu = MEANS[labels]

    def scale(t):
        return np.sqrt(float(SDE.alpha(t)) ** 2 * SPREAD**2 + float(SDE.sigma(t)) ** 2)

    z = (np.asarray(x_T) - float(SDE.alpha(t1)) * mu) / scale(t1)
    return float(SDE.alpha(t0)) * mu + scale(t0) * z


def starts(n, seed=0):
    x = SDE.prior_sample(jax.random.PRNGKey(seed), (n, DIM), jnp.float64)
    labels = np.asarray(jax.random.randint(jax.random.PRNGKey(seed + 1), (n,), 0, CLASSES))
    return np.asarray(x), labels.astype(np.int32)


def test_teacher_solves_each_row_for_its_class_and_caches_by_labels(tmp_path, monkeypatch):
    """The teacher's endpoints are the exact flow of each row's own class (chunked solves
    included), not of a shuffled class; a cached teacher is reused for the same labels and
    solved again for others (its file keeps them)."""
    x, labels = starts(12)
    t0, t1 = SDE.interval(None, None)
    common = dict(num_points=17, substeps=2, model_id="m", keep_states=True)
    teach = solve_teacher(SDE, conditional_eps, x, labels=labels, batch_size=5, **common)
    want = exact_x0(x, labels, t0, t1)
    assert np.abs(teach.x0 - want).max() < 10 * teach.error_estimate < 0.01
    np.testing.assert_array_equal(teach.labels, labels)
    shuffled = np.roll(labels, 1)
    other = solve_teacher(SDE, conditional_eps, x, labels=shuffled, **common)
    assert np.sqrt(np.mean((other.x0 - teach.x0) ** 2)) > 0.5  # the labels matter

    solves = []
    real_solve = teacher_module.solve_teacher

    def counted(*args, **kwargs):
        solves.append(kwargs.get("labels"))
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(teacher_module, "solve_teacher", counted)
    path = str(tmp_path / "t.npz")
    first = load_or_solve_teacher(path, SDE, conditional_eps, x, labels=labels, **common)
    again = load_or_solve_teacher(path, SDE, conditional_eps, x, labels=labels, **common)
    assert len(solves) == 1 and np.array_equal(again.x0, first.x0)
    np.testing.assert_array_equal(load_teacher(path).labels, labels)
    redone = load_or_solve_teacher(path, SDE, conditional_eps, x, labels=shuffled, **common)
    assert len(solves) == 2  # other classes: not the cached teacher
    np.testing.assert_allclose(redone.x0, other.x0, rtol=0, atol=1e-12)
    assert load_teacher(path).settings["labels_sha256"] == redone.settings["labels_sha256"]


@pytest.mark.parametrize("declared", [False, True], ids=["vmapped", "one_call"])
def test_epd_probe_call_gets_the_tiled_labels(declared):
    """EPD (K = 3, random tables) evaluates its K probes as one network call on the K·B
    concatenated rows: with the labels tiled to match, it equals the per-probe loop (the
    same rule with sequential stage calls) and each row sampled on its own. Both the model
    called once per call (per-sample times declared) and the one vmapped per row."""
    eps_fn = per_sample_time(conditional_eps) if declared else conditional_eps
    plan = make_plan(SDE, method="epd", parallel_nfe=5, afs=True, probes=3)
    raw = plan.rule.init_params(seed=3, init="normal")
    x, labels = starts(6, seed=4)
    x = jnp.asarray(x)
    got = sample(plan, eps_fn, x, rule_params=RuleParams.for_plan(plan, raw), labels=labels)
    sequential = plan.structure._replace(parallel=False)
    loop = run_table(eps_fn, plan.table, x, structure=sequential, rule=plan.rule,
                     rule_params=raw, first_eps_scale=plan.first_eps_scale,
                     labels=jnp.asarray(labels))  # fmt: skip
    np.testing.assert_allclose(got, loop, rtol=0, atol=1e-12)
    rows = [sample(plan, eps_fn, x[i : i + 1], rule_params=RuleParams.for_plan(plan, raw),
                   labels=labels[i : i + 1])[0] for i in range(len(x))]  # fmt: skip
    np.testing.assert_allclose(got, np.stack(rows), rtol=0, atol=1e-12)
    wrong = sample(plan, eps_fn, x, rule_params=RuleParams.for_plan(plan, raw),
                   labels=np.roll(labels, 1))  # fmt: skip
    assert np.abs(np.asarray(wrong) - np.asarray(got)).max() > 0.5


def test_minibatches_and_measurements_keep_each_rows_class(tmp_path):
    """AMED-Plugin's predictor (per-sample times, the model vmapped per row with its label)
    and an LD3 grid trained on minibatches of 4, and the held-out distances measured in
    batches of 5: every minibatch loss and distance is the sampler's small error, never the
    O(1) of a row given another row's class (which the last lines show the measure would
    see)."""
    x, labels = starts(24, seed=7)
    plan = make_plan(SDE, method="amed_ipndm", nfe=5, afs=True, predictor="stepwise")
    teach = amed_teacher(plan, conditional_eps, x, path=str(tmp_path / "a.npz"), model_id="m",
                         num_points=9, substeps=2, labels=labels)  # fmt: skip
    losses = []
    fit = fit_amed(plan, conditional_eps, teach, loss="endpoint", steps=6, batch_size=4,
                   learning_rate=0.05,
                   callback=lambda k, train, val: losses.append(train))  # fmt: skip
    assert len(losses) == 6 and max(losses) < 1.0, losses  # one row of 4 mislabelled: > 2
    assert fit.loop.init_val_loss < 1.0

    grid_losses = []
    optimize_grid(SDE, conditional_eps, x, method="ipndm", order=2, nfe=4, grid=None,
                  teacher=teach, labels=labels, callback=lambda k, t, v: grid_losses.append(t),
                  ld3_settings={"steps": 4, "batch_size": 4})  # fmt: skip
    assert len(grid_losses) == 4 and max(grid_losses) < 1.0, grid_losses  # (rms: d, not d^2)
    with pytest.raises(ValueError, match="other class labels"):
        optimize_grid(SDE, conditional_eps, x, method="ipndm", order=2, nfe=4, grid=None,
                      teacher=teach, labels=np.roll(labels, 1))  # fmt: skip

    t0, t1 = SDE.interval(None, None)
    d = endpoint_distances(plan, conditional_eps, x, exact_x0(x, labels, t0, t1),
                           batch_size=5, rule_params=fit.params, labels=labels)  # fmt: skip
    assert d.max() < 1.0, d
    d_wrong = endpoint_distances(plan, conditional_eps, x, exact_x0(x, labels, t0, t1),
                                 batch_size=5, rule_params=fit.params,
                                 labels=np.roll(labels, 1))  # fmt: skip
    assert np.median(d_wrong) > 2.0


def tiny_imagenet_config():
    """``configs/epd_imagenet64.py`` on a tiny random ADM (8x8, one block of 16 channels, the
    1000 classes kept) with a few starting points and updates."""
    from configs import epd_imagenet64

    config = epd_imagenet64.get_config()
    kw = config.model.kwargs
    kw.img_resolution, kw.model_channels, kw.channel_mult = 8, 16, [1]
    kw.num_blocks, kw.attn_resolutions, kw.use_fp16 = 1, [], False
    config.model.dtype = "float32"
    config.data.image_size = 8
    fit = config.fit
    fit.params = "random"
    fit.methods = (epd_imagenet64.EPD,)  # its K = 2 probes: one call on 2B rows
    fit.nfes = (3,)
    fit.num_fit, fit.num_heldout, fit.validation_fraction = 8, 4, 0.25
    fit.teacher_points, fit.teacher_substeps, fit.heldout_substeps = 4, 1, 1
    fit.amed.steps, fit.amed.patience, fit.amed.batch_size = 2, 2, 3
    fit.amed.loss = "endpoint"  # one scan to differentiate (teacher-forced: one per step)
    fit.plot_nfe = 3
    return config


def test_epd_imagenet64_config_fits_end_to_end(tmp_path):
    """The config validates as main.py validates it (both variants), and its ``--mode=fit``
    runs on a tiny random class-conditional EDM network (EPD-Solver, whose probe call is the
    one that concatenates rows; the other methods share every other path): the file is
    where the table mode reads it, each starting point has its class in the teachers, and
    the held-out RMSE is finite."""
    from configs import epd_imagenet64
    from deis_jax.experiments import fit as fit_mode
    from deis_jax.experiments.modes import get_mode
    from deis_jax.experiments.table import cells as table_cells

    for variant in epd_imagenet64.VARIANTS:
        config = epd_imagenet64.get_config(variant)
        plan = get_mode("fit").validate(config)
        assert {c.payload[3] for c in plan.cells} == {"default", "amed"}
    config = tiny_imagenet_config()
    workdir = str(tmp_path / "run")
    records = fit_mode.run(config, workdir)
    assert len(records) == 2 and not any(r.get("failed") for r in records)
    assert all(np.isfinite(r["heldout_rmse"]) for r in records)
    grids = tmp_path / "run" / "grids" / "imagenet_resized" / "64x64"
    (row,) = table_cells.TABLES["epd_imagenet64"].select("EPD-Solver")
    assert (grids / row.predictor_path("", 3)).is_file()
    heldout = load_teacher(str(tmp_path / "run" / "teachers" / "imagenet_resized" /
                                "64x64_heldout.npz"))  # fmt: skip
    assert heldout.labels.shape == (4,) and heldout.labels.max() < 1000
