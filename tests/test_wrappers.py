"""The one model interface: every prediction kind and conditioning convention -> eps_fn."""

import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as deis
from deis_jax.evaluation.analytic import GaussianMixture
from deis_jax.sampling.wrappers import eps_fn_from_model, guided_eps_fn

MIX = GaussianMixture.ring(4, radius=1.0, std=0.3)


@pytest.mark.parametrize(
    "schedule",
    [deis.VPSDE.linear(), deis.SubVPSDE(), deis.VESDE(), deis.DiscreteVPSDE.linear()],
    ids=["vp", "subvp", "ve", "discrete"],
)
@pytest.mark.parametrize("prediction", ["eps", "score", "x0", "v"])
def test_every_prediction_kind_recovers_eps(schedule, prediction):
    exact = MIX.eps_fn(schedule)
    t = 0.3 * schedule.t_max
    seen = []

    def model_fn(x, cond):  # a network predicting `prediction`, conditioned on model_time
        seen.append(np.asarray(cond))
        eps = exact(x, jnp.asarray(t))
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        x0 = (x - sigma * eps) / alpha
        return {"eps": eps, "score": -eps / sigma, "x0": x0, "v": alpha * eps - sigma * x0}[
            prediction
        ]

    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)))
    got = eps_fn_from_model(model_fn, schedule, prediction)(x, jnp.asarray(t))
    np.testing.assert_allclose(got, exact(x, jnp.asarray(t)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(seen[0], np.full(5, schedule.model_time(t)), rtol=1e-12)


def test_time_input_override_and_guidance():
    s = deis.VPSDE.linear()
    calls = []
    eps_fn = eps_fn_from_model(lambda x, c: calls.append(c) or x, s, time_input=lambda t: 7 * t)
    eps_fn(jnp.ones((3, 2)), jnp.asarray(0.5))
    np.testing.assert_allclose(calls[0], [3.5, 3.5, 3.5])
    guided = guided_eps_fn(lambda x, t: x + 1.0, lambda x, t: x, guidance_scale=3.0)
    np.testing.assert_allclose(guided(jnp.zeros(2), 0.1), [3.0, 3.0])


def test_unknown_prediction_is_rejected():
    with pytest.raises(ValueError, match=r"prediction must be one of \('eps', 'score'"):
        eps_fn_from_model(lambda x, c: x, deis.VPSDE.linear(), "noise")


def test_per_example_times_broadcast_over_the_batch_axis():
    # B equals the channel count on purpose: a wrong broadcast would go unnoticed otherwise.
    s = deis.VPSDE.linear()
    exact = MIX.eps_fn(s)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2)))
    ts = jnp.asarray([0.2, 0.7])

    def x0_model(x, cond):
        t = cond / 999.0
        eps = jnp.stack([exact(x[i : i + 1], t[i])[0] for i in range(2)])
        return (x - s.sigma(t)[:, None] * eps) / s.alpha(t)[:, None]

    got = eps_fn_from_model(x0_model, s, "x0")(x, ts)
    want = jnp.stack([exact(x[i : i + 1], ts[i])[0] for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-10)
