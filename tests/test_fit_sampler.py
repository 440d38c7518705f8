"""``fit_sampler`` and the fitting entry points on a model written to the scalar-time contract.

The recipes beat their base on a small mixture within seconds, every budget is spent exactly,
a fitted sampler file round-trips and is refused for another schedule, interval, NFE or model,
and a fit that trades typical samples for a few hard ones is refused.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as deis
from deis_jax.fitting import recipes
from deis_jax.fitting.amed import fit_amed, init_params
from deis_jax.fitting.teacher import solve_teacher
from deis_jax.sampling.wrappers import per_sample_time

SDE = deis.VPSDE.linear()
MIXTURE = deis.GaussianMixture.embedded(6, 4, latent_dim=3, radius=2.0, std=0.4, seed=1)
X_FIT = np.asarray(SDE.prior_sample(jax.random.PRNGKey(0), (40, 6), jnp.float64))
SMALL = {"ld3_settings": {"steps": 40}, "amed_settings": {"steps": 40, "batch_size": 8}}


def scalar_time_eps(x, t):
    """A model written to the contract: ``t`` a scalar. It refuses anything else, the way a
    real one would fail (or silently broadcast a (B,) time against the wrong axis)."""
    if jnp.ndim(t) != 0:
        raise TypeError(f"this model takes a scalar t, got shape {jnp.shape(t)}")
    return MIXTURE.eps_fn(SDE)(x, t)


@pytest.fixture(scope="module")
def teacher():
    with jax.enable_x64(True):
        return solve_teacher(SDE, MIXTURE.eps_fn(SDE), X_FIT, num_points=21, substeps=2,
                             keep_states=False)  # fmt: skip


@pytest.fixture(scope="module")
def fitted(teacher):
    with jax.enable_x64(True):
        return deis.fit_sampler(SDE, scalar_time_eps, X_FIT, nfe=4, model_id="mixture-6",
                                teacher=teacher, **SMALL)  # fmt: skip


def test_amed_calls_a_scalar_time_model_per_sample():
    """AMED's intermediate times differ per sample: a scalar-time model is called once per
    row (vmapped), a model declaring per-sample times once for the batch; the samples agree
    (two compiled programs, float64: a few ulp through 5 steps)."""
    plan = deis.make_plan(SDE, method="amed_ipndm", nfe=5, afs=True, predictor="stepwise")
    params = {**init_params(plan, scalar_time_eps, X_FIT), "r_logit": jnp.linspace(-1, 1, 3)}
    params = deis.RuleParams.for_plan(plan, params)
    x = jnp.asarray(X_FIT[:5])
    with jax.enable_x64(True):
        vmapped = deis.sample(plan, scalar_time_eps, x, rule_params=params)
        batched = deis.sample(plan, MIXTURE.eps_fn(SDE), x, rule_params=params)
    np.testing.assert_allclose(vmapped, batched, rtol=1e-12, atol=1e-13)


def test_a_model_declared_per_sample_that_fails_on_them_is_named():
    declared = per_sample_time(scalar_time_eps)
    plan = deis.make_plan(SDE, method="amed", nfe=3, afs=True, predictor="stepwise")
    params = deis.RuleParams.for_plan(plan, init_params(plan, scalar_time_eps, X_FIT))
    message = (r"eps_fn declares that it takes one time per sample \(it is built by "
               r"eps_fn_from_model or marked per_sample_time\), but failed with t of shape "
               r"\(5,\) .*this model takes a scalar t")  # fmt: skip
    with pytest.raises(TypeError, match=message):
        deis.sample(plan, declared, jnp.asarray(X_FIT[:5]), rule_params=params)


def test_scalar_time_model_through_optimize_grid_and_fit_amed(teacher):
    with jax.enable_x64(True):
        grid = deis.optimize_grid(SDE, scalar_time_eps, X_FIT, method="ipndm", order=3, nfe=4,
                                  afs=True, teacher=teacher, learn_table=True,
                                  ld3_settings={"steps": 20})  # fmt: skip
        assert grid.nfe == 4 and grid.options == {"afs": True}
        assert grid.provenance["val_loss_fitted"] < grid.provenance["val_loss_init"]
        plan = deis.make_plan(SDE, method="amed_ipndm", nfe=4, predictor="stepwise")
        fit = fit_amed(plan, scalar_time_eps, teacher, loss="endpoint", steps=20, batch_size=8)
    assert fit.loop.best_val_loss < fit.loop.init_val_loss


def test_fit_sampler_beats_the_default_and_reports_every_recipe(fitted):
    names = [r["name"] for r in fitted.report]
    assert names == ["default (ipndm3)", *recipes.AUTO_RECIPES]
    assert all(not r["status"].startswith("failed") for r in fitted.report)
    default = fitted.report[0]
    best = min(fitted.report, key=lambda r: r["objective"])
    assert fitted.recipe.startswith(best["name"])
    # the mixture is easy to fit: the chosen sampler is several times below the default
    assert fitted.provenance["gain_over_default"] > 2.0
    assert fitted.provenance["chosen_median"] < default["median"]
    assert "Chosen: **" in fitted.report_markdown()
    for r in fitted.report[1:]:  # every kept fit lowered its objective under its base's
        if r["status"] == "fitted":
            assert r["objective"] < r["base_objective"] and r["median"] <= r["base_median"]


def test_fitted_sampler_file_round_trips_and_refuses_other_settings(fitted, tmp_path):
    path = str(tmp_path / "sampler.json")
    fitted.save(path)
    loaded = deis.FittedSampler.load(path, SDE, nfe=4, model_id="mixture-6")
    x = jnp.asarray(X_FIT[:8])
    with jax.enable_x64(True):
        # the same plan rebuilt from the file runs the same program: the same samples
        np.testing.assert_array_equal(loaded.sample(scalar_time_eps, x),
                                      fitted.sample(scalar_time_eps, x))  # fmt: skip
    assert loaded.recipe == fitted.recipe and loaded.report == fitted.report
    cases = [
        (dict(schedule=deis.VPSDE.cosine()), r"schedule: fitted for"),
        (dict(nfe=5), r"nfe: fitted for 4, asked for 5"),
        (dict(t0=1e-4), r"t0: fitted for 0\.001, asked for 0\.0001"),
        (dict(model_id="another"), r"model_id: fitted for 'mixture-6', asked for 'another'"),
    ]
    for change, message in cases:
        kwargs = {"schedule": SDE, **change}
        with pytest.raises(ValueError, match="fitted for other settings: .*" + message):
            deis.FittedSampler.load(path, kwargs.pop("schedule"), **kwargs)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"nfe": 4', '"nfe": 3', 1))
    with pytest.raises(ValueError, match="does not match the sha256 recorded in it"):
        deis.FittedSampler.load(path, SDE)


def test_a_fit_that_raises_the_median_is_refused_for_its_base():
    """The squared loss can buy a lower mean with worse typical samples: refused, the base
    stands in; a fit that does not lower the objective falls back."""
    base = recipes._Candidate("r base", None, np.array([0.02, 0.02, 0.02, 0.5]), "rms")
    chasing = recipes._Candidate("r", None, np.array([0.05, 0.05, 0.05, 0.1]), "rms")
    status, kept = recipes._judge(chasing, base)
    assert status.startswith("refused: the fit raised the median") and kept is base
    worse = recipes._Candidate("r", None, base.distances * 1.1, "rms")
    status, kept = recipes._judge(worse, base)
    assert status.startswith("fallback") and kept is base
    better = recipes._Candidate("r", None, base.distances * 0.5, "rms")
    assert recipes._judge(better, base) == ("fitted", better)


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_every_recipe_spends_every_budget_exactly(name):
    recipe = recipes.RECIPES[name]
    for nfe in range(1, 13):
        plan = recipes._base_plan(SDE, recipe, nfe, 1e-3, 1.0, scalar_time_eps)
        assert plan.nfe == nfe and plan.afs == recipe.uses_afs(nfe), (name, nfe)


def test_bad_recipes_and_losses_are_refused_before_any_work():
    with pytest.raises(ValueError, match=r"recipe must be 'auto' or among \("):
        deis.fit_sampler(SDE, scalar_time_eps, X_FIT, nfe=4, recipe="ld4")
    with pytest.raises(ValueError, match=r"loss must be one of \('mse', 'rms', 'trimmed_rms'\)"):
        deis.fit_sampler(SDE, scalar_time_eps, X_FIT, nfe=4, loss="l1")
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        deis.fit_sampler("vpsde", scalar_time_eps, X_FIT, nfe=4)
