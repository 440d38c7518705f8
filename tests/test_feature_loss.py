"""The learned samplers' feature loss (``fit_amed(loss='features' | 'features_endpoint')``):
the papers' final-step distance in a feature network's space (specs/epd_adasde.md section 0),
its feature networks (``deis_jax.evaluation.features.sample_features``) and the fit mode's
``config.fit.amed.loss``."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import amed_digits, amed_gmm
from deis_jax.common import data, image_grid
from deis_jax.common.checks import ConfigError
from deis_jax.evaluation import features, fid
from deis_jax.evaluation import inception as inc
from deis_jax.evaluation.analytic import GaussianMixture
from deis_jax.evaluation.digits_classifier import DigitsClassifier
from deis_jax.experiments import gmm
from deis_jax.experiments.fit import cells
from deis_jax.experiments.modes import get_mode
from deis_jax.experiments.validation import validate_sde
from deis_jax.fitting.amed import AmedPredictorFile, amed_teacher, fit_amed, per_sample_loss
from deis_jax.sampling.method_spec import parse_method_spec
from deis_jax.sampling.rule_params import RuleParams
from deis_jax.sampling.sampler import make_plan, sample
from deis_jax.sampling.sde import VPSDE

SDE = VPSDE()


def _mixture_problem(dim=8, n=3):
    """The iPNDM plugin (a rollout with history; random logits) on an 8-D mixture, float64."""
    eps_fn = gmm.mixture_for_dim(amed_gmm.get_config(), dim).eps_fn(SDE)
    plan = make_plan(SDE, method="amed_ipndm", nfe=4, predictor="stepwise")
    x = SDE.prior_sample(jax.random.PRNGKey(6), (n, dim), jnp.float64)
    params = {"r_logit": jnp.linspace(-1.0, 1.0, plan.num_steps),
              "c_logit": jnp.full(plan.num_steps, 0.3)}  # fmt: skip
    targets = jax.random.normal(jax.random.PRNGKey(7), (n, plan.num_steps, dim), jnp.float64)
    return eps_fn, plan, x, params, targets


def test_feature_loss_is_the_papers_formula_and_reduces_to_l2_for_the_identity():
    """``features``: L2 to the teacher at every grid point but the last, plus alpha times the
    squared feature distance at the last (averaged over feature dims); ``features_endpoint``
    the last term alone. With phi = identity and alpha = 1 they are ``trajectory`` and
    ``endpoint``."""
    with jax.enable_x64(True):
        eps_fn, plan, x, params, targets = _mixture_problem()
        w = jax.random.normal(jax.random.PRNGKey(8), (8, 5), jnp.float64)

        def phi(y):
            return jnp.tanh(y @ w)

        _, states = sample(plan, eps_fn, x, trajectory=True,
                           rule_params=RuleParams.for_plan(plan, params))  # fmt: skip
        states, targets_np, n = np.asarray(states), np.asarray(targets), plan.num_steps
        last = 2.5 * np.mean((np.asarray(phi(states[n])) - np.asarray(phi(targets[:, -1]))) ** 2,
                             axis=1)  # fmt: skip
        early = sum(np.mean((states[k + 1] - targets_np[:, k]) ** 2, axis=1) for k in range(n - 1))

        def loss(name, **kw):
            return np.asarray(per_sample_loss(plan, params, eps_fn, x, targets, name, **kw))

        # float64, the same operations in two compiled programs: rounding only (~1e-16 rel)
        kw = dict(feature_fn=phi, feature_weight=2.5)
        np.testing.assert_allclose(loss("features", **kw), early + last, rtol=1e-12)
        np.testing.assert_allclose(loss("features_endpoint", **kw), last, rtol=1e-12)
        assert np.all(early > 0) and np.all(last > 0)
        identity = dict(feature_fn=lambda y: y, feature_weight=1.0)
        np.testing.assert_allclose(loss("features_endpoint", **identity), loss("endpoint"),
                                   rtol=1e-13)  # fmt: skip
        np.testing.assert_allclose(loss("features", **identity), loss("trajectory"), rtol=1e-13)


def test_feature_fn_is_required_exactly_for_the_feature_losses(tmp_path):
    with jax.enable_x64(True):
        eps_fn, plan, x, params, targets = _mixture_problem()
        with pytest.raises(ValueError, match="loss='features' compares the final states in a "
                           "feature space: pass feature_fn"):  # fmt: skip
            per_sample_loss(plan, params, eps_fn, x, targets, "features")
        with pytest.raises(ValueError, match=r"feature_fn is for the losses \('features', "
                           r"'features_endpoint'\), not loss='endpoint'"):  # fmt: skip
            per_sample_loss(plan, params, eps_fn, x, targets, "endpoint", feature_fn=jnp.tanh)
        with pytest.raises(ValueError, match="feature_weight must be a positive number"):
            per_sample_loss(plan, params, eps_fn, x, targets, "features", feature_fn=jnp.tanh,
                            feature_weight=0.0)  # fmt: skip
        teacher = amed_teacher(plan, eps_fn, x, path=str(tmp_path / "t.npz"), model_id="m",
                               num_points=4, substeps=1)  # fmt: skip
        with pytest.raises(ValueError, match="pass feature_fn"):
            fit_amed(plan, eps_fn, teacher, loss="features_endpoint", steps=1)
        with pytest.raises(ValueError, match="feature_fn is for the losses"):
            fit_amed(plan, eps_fn, teacher, loss="auto", steps=1, feature_fn=jnp.tanh)
        with pytest.raises(ValueError, match="needs feature_id"):
            fit_amed(plan, eps_fn, teacher, loss="features", steps=1, feature_fn=jnp.tanh,
                     state_path=str(tmp_path / "s"))  # fmt: skip


def test_resumed_state_is_refused_for_another_loss_or_feature_network(tmp_path, caplog):
    """The feature network (``feature_id``), its weight and the loss are in the state's
    identity: a state fitted with another one starts over (with a warning), the same one
    resumes."""
    with jax.enable_x64(True):
        eps_fn = gmm.mixture_for_dim(amed_gmm.get_config(), 4).eps_fn(SDE)
        plan = make_plan(SDE, method="amed", nfe=3, afs=True, predictor="stepwise")
        x_fit = SDE.prior_sample(jax.random.PRNGKey(4), (12, 4), jnp.float64)
        teacher = amed_teacher(plan, eps_fn, x_fit, path=str(tmp_path / "t.npz"), model_id="m",
                               num_points=4, substeps=1)  # fmt: skip
        state = str(tmp_path / "state")
        base = dict(steps=2, learning_rate=0.05, batch_size=None, state_path=state)
        tanh = dict(loss="features_endpoint", feature_fn=jnp.tanh, feature_id="tanh")
        fit = fit_amed(plan, eps_fn, teacher, **base, **tanh)
        assert fit_amed(plan, eps_fn, teacher, **base, **tanh).loop.resumed_step == 2
        saved = open(state, "rb").read()
        others = [
            dict(tanh, feature_fn=jnp.sin, feature_id="sin"),  # another feature network
            dict(tanh, feature_weight=20.0),  # another weight
            dict(loss="endpoint"),  # an L2 loss
        ]
        for kwargs in others:
            with open(state, "wb") as f:  # the state is tanh's again
                f.write(saved)
            caplog.clear()
            with caplog.at_level(logging.WARNING):  # (no update: the refusal is at the start)
                other = fit_amed(plan, eps_fn, teacher, **dict(base, steps=0), **kwargs)
            assert other.loop.resumed_step == 0, kwargs
            assert f"ignoring the training state {state}: written for" in caplog.text
    provenance = fit.predictor.provenance
    assert (provenance["features"], provenance["feature_weight"]) == ("tanh", 10.0)
    assert "features" not in other.predictor.provenance


def _digit_mixture(schedule):
    """16x16x1 data: a mixture around 4 real digits (centred, [-1, 1]) with std 0.1, its
    exact eps on images; the digits classifier's features on the centred scale."""
    means = data.digits_images(16)[:4].reshape(4, -1).astype(np.float64) / 127.5 - 1.0
    eps_flat = GaussianMixture(means, np.full(4, 0.1), np.ones(4)).eps_fn(schedule)

    def eps_fn(x, t):
        return eps_flat(x.reshape(x.shape[0], -1), t).reshape(x.shape)

    return eps_fn


def test_fit_cell_trains_on_the_digits_classifier_features(tmp_path):
    """``--mode=fit``'s amed cell with ``config.fit.amed.loss='features'`` and
    ``config.eval``'s extractor (the digits classifier), on a mixture of digit images:
    AMED-Solver at NFE 5 on the log-SNR grid (float32, 18 + 6 starting points, 15 Adam
    steps at lr 0.1) lowers the
    validation loss by a margin (a broken gradient through the classifier would not lower it
    20%); the predictor file names the feature network; without it the cell is refused."""
    config = _digits_fit_config("features")
    config.fit.amed.update(steps=15, batch_size=6, learning_rate=0.1)
    config.fit.update(teacher_points=13, teacher_substeps=2, heldout_substeps=1)
    config.sampler.grid = "log_snr"  # (AMED's linear grid at NFE 5 leaves little to learn)
    settings = cells.FitSettings.from_config(config)
    schedule = validate_sde(config)
    eps_fn = _digit_mixture(schedule)
    x_fit, x_held = cells.draw_starting_points(schedule, 0, (16, 16, 1), 24, 4)
    problem = cells.FitProblem("digits", eps_fn, "mixture", x_fit, x_held)
    t0, t1 = schedule.interval(config.sampler.t0, config.sampler.t1)
    teach = cells.teachers(settings, problem, schedule, t0, t1, str(tmp_path), with_fit=False)
    choice = parse_method_spec("amed:afs=true,predictor=stepwise")
    args = (settings, schedule, problem, teach, choice, 5, "amed", str(tmp_path))
    with pytest.raises(ValueError, match="loss='features' needs the feature network"):
        cells.compute_cell(*args)
    phi = features.sample_features_from_config(config)
    record = cells.compute_cell(*args, features=phi)
    assert record["val_loss_fitted"] < 0.8 * record["val_loss_init"], record["val_loss_curve"]
    provenance = AmedPredictorFile.load(str(tmp_path / record["grid_file"])).provenance
    assert (provenance["loss"], provenance["features"]) == ("features", phi.identity)
    assert "digits_classifier" in phi.identity


def test_sample_features_are_the_metrics_features_on_unrounded_pixels():
    """On samples whose pixels are exact levels, the loss's features are the metric's
    (``fid.sample_images`` -> ``features_and_logits``); they are differentiable in the
    samples (zero gradient only where the pixels are clipped)."""
    clf = DigitsClassifier.load()
    phi = features.sample_features(clf, centered=True)
    levels = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 1))
    x = jnp.asarray(levels / 127.5 - 1.0, jnp.float32)
    np.testing.assert_array_equal(fid.sample_images(x, True), levels)
    # float32 pixels within ~3e-5 of the levels, through a 4-layer net of O(1) weights
    np.testing.assert_allclose(phi.fn(x), clf.features_and_logits(fid.sample_images(x, True))[0],
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    noisy = np.random.default_rng(1).normal(size=(4, 16, 16, 1)) * 1.5  # some clipped
    noisy[0, 0, 0, 0] = np.nan
    np.testing.assert_array_equal(  # the metric's images are what they were before
        fid.sample_images(noisy, True),
        image_grid.to_uint8(data.postprocess(np.nan_to_num(noisy), True)),
    )
    x = x.at[0, 0, 0, 0].set(1.5)  # clipped: no gradient there
    grad = jax.grad(lambda x: jnp.sum(phi.fn(x) ** 2))(x)
    assert grad[0, 0, 0, 0] == 0 and np.count_nonzero(np.asarray(grad)) > 0.9 * grad.size
    assert "digits_classifier" in phi.identity and clf.weights_sha256 in phi.identity


def test_inception_sample_features_have_a_gradient_of_the_samples_shape():
    """The Inception's pool_3 as a function of CIFAR-shaped samples: 2048 features and a
    gradient (traced only, ``eval_shape``: nothing is computed)."""
    extractor = object.__new__(inc.InceptionExtractor)  # shapes only: no weights drawn
    extractor.variables, extractor.resize = inc.variable_shapes(), inc.INPUT_SIZE
    extractor.weights_sha256 = "shapes"
    phi = features.sample_features(extractor, centered=True)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    assert jax.eval_shape(lambda f, x: f(x), phi.fn, x).shape == (2, inc.FEATURE_DIM)
    grad = jax.eval_shape(jax.grad(lambda f, x: jnp.sum(f(x) ** 2), argnums=1), phi.fn, x)
    assert grad.shape == x.shape and "inception_v3_fid" in phi.identity


def _digits_fit_config(loss):
    config = amed_digits.get_config()
    config.fit.amed.loss = loss
    return config


def test_fit_mode_takes_the_feature_loss_for_images_and_refuses_it_for_the_mixtures(tmp_path):
    """``config.fit.amed.loss='features'``: refused for the gmm mixtures naming the field
    and the allowed values; for an image model it validates, needs ``config.eval`` (the
    Inception weights file for ``fid``) at start-up, and enters the cells' identity."""
    fit = get_mode("fit")
    config = amed_gmm.get_config()
    config.fit.amed.loss = "features"
    allowed = r"use one of \('auto', 'teacher_forced', 'trajectory', 'endpoint'\)"
    with pytest.raises(ConfigError, match=r"config.fit.amed.loss='features' .* gmm .*" + allowed):
        fit.validate(config)
    plan = fit.validate(_digits_fit_config("features"))
    assert plan.fingerprint != fit.validate(_digits_fit_config("auto")).fingerprint
    config = _digits_fit_config("features_endpoint")
    config.fit.amed.feature_weight = 0.0
    with pytest.raises(ConfigError, match="config.fit.amed.feature_weight"):
        fit.validate(config)
    config = _digits_fit_config("features")
    config.eval.metric = "fid"
    config.eval.inception_weights = str(tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match="config.eval.inception_weights: no file at"):
        fit.check_inputs(config, str(tmp_path), fit.validate(config))
