"""EPD-Solver / EPD-Plugin / AdaSDE (``deis_jax.sampling.solvers.probe``): the step rule
against an independent reimplementation in EDM variables, the neutral reductions to the base
steps, the one batched probe call, the NFE accounting and AdaSDE's noise invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_amed import mixture_eps

from deis_jax.sampling import solvers
from deis_jax.sampling.coefficients import ADAMS_BASHFORTH
from deis_jax.sampling.rule_params import RuleParams
from deis_jax.sampling.sampler import make_plan, per_sample_normal, sample
from deis_jax.sampling.sde import VPSDE, DiscreteVPSDE
from deis_jax.sampling.solvers.probe import constrained
from deis_jax.sampling.wrappers import per_sample_time

SDE = VPSDE()
EPS = mixture_eps(SDE)
KEY = jax.random.PRNGKey(7)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def x_T(batch=5, dim=3, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, dim))


def reference(plan, raw, x, key=None, sde=SDE, eps=EPS):
    """The spec's update (epd_adasde.md 1.3, 1.4, 2.2) in v = x/alpha, rho = sigma/alpha,
    one network call per probe, an explicit list of first-stage directions: no table. The
    network's levels are capped at ``sde.rho_limit`` (spec §4: a <- min(a, limit / tau),
    gamma_bar <- min(gamma_bar, limit / rho_n - 1))."""
    method, opts, ts = plan.method, plan.rule.options, plan.ts
    rho = np.asarray(sde.rho(ts))
    alpha = np.exp(np.asarray(sde.log_alpha(ts)))
    limit = sde.rho_limit

    def d(v, rho_net):
        t = sde.t_from_rho(jnp.asarray(rho_net))
        return eps(jnp.exp(sde.log_alpha(t)) * v, t)

    r, w, c, a, gamma = (None if v is None else np.asarray(v)
                         for v in constrained(method, opts, raw))  # fmt: skip
    v, firsts = x / alpha[0], []
    index = jnp.arange(x.shape[0])
    for n in range(len(ts) - 1):
        rho_hat = rho[n]
        if gamma is not None and n > 0:
            rho_hat = min(1 + np.sum(w[n] * gamma[n]), max(limit / rho[n], 1.0)) * rho[n]
            z = per_sample_normal(key, index, n, x.shape, x.dtype)
            v = v + np.sqrt(rho_hat**2 - rho[n] ** 2) * z
        d_hat = v / np.sqrt(1 + rho_hat**2) if (plan.afs and n == 0) else d(v, rho_hat)
        firsts.append(d_hat)
        q = min(plan.order, n) if method == "epd_ipndm" else 0
        pred = sum(wj * firsts[-1 - j] for j, wj in enumerate(ADAMS_BASHFORTH[q]))
        step = 0.0
        for k in range(r.shape[1]):
            tau = rho_hat ** (1 - r[n, k]) * rho[n + 1] ** r[n, k]
            scale = min(a[n, k], max(limit / tau, 1.0))
            g = scale * d(v + (tau - rho_hat) * pred, scale * tau)
            step = step + w[n, k] * c[n, k] * g
        v = v + (rho[n + 1] - rho_hat) * step
    return alpha[-1] * v


@pytest.mark.parametrize(
    "method, options, order",
    [("epd", {}, 0), ("epd", {"probes": 3}, 0), ("epd_ipndm", {}, 2),
     ("epd_ipndm", {"probes": 1}, 3), ("adasde", {}, 0), ("adasde", {"probes": 2}, 0)],
)  # fmt: skip
def test_rule_matches_reference(method, options, order):
    """Random raw tables (the papers' N(0, 1) init): the table rule in the one scan equals the
    direct update (float64: agreement to rounding, 1e-10 relative after 4 steps)."""
    plan = make_plan(SDE, method=method, order=order, parallel_nfe=7, afs=True,
                     scale_dir=0.3, scale_time=0.3, **options)  # fmt: skip
    raw = plan.rule.init_params(seed=3, init="normal")
    x = x_T()
    key = KEY if plan.stochastic else None
    got = sample(plan, EPS, x, key, rule_params=RuleParams.for_plan(plan, raw))
    want = reference(plan, {k: np.asarray(v, np.float64) for k, v in raw.items()}, x, key)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sde", [VPSDE.cosine(), DiscreteVPSDE.linear()], ids=["cosine", "ddpm"])
@pytest.mark.parametrize("method", ["epd", "adasde"])
def test_levels_capped_where_the_schedule_ends(sde, method):
    """Where t(rho) ends (the cosine schedule, a DDPM table), probes with a > 1 at the grid's
    start and AdaSDE's churn are capped at ``rho_limit``: the network never gets a time past
    t_max, and the update (with the capped scale) equals the spec's (float64, 1e-10 after 3
    steps). Uncapped, the step-0 probes would ask for up to 1.5 rho_limit."""
    eps, times = mixture_eps(sde), []

    @per_sample_time
    def eps_fn(x, t):
        jax.debug.callback(lambda t: times.append(np.max(t)), t)  # t is traced in the scan
        return eps(x, t)

    churn = {"gamma_max": 0.5} if method == "adasde" else {}
    plan = make_plan(
        sde, method=method, parallel_nfe=6, scale_time=0.5, probes=2, t1=sde.t_max, **churn
    )
    raw = {k: np.asarray(v, np.float64) for k, v in plan.rule.init_params().items()}
    raw["a"] = np.full_like(raw["a"], 50.0)  # a = 1 + scale_time: the bound, at every probe
    raw["r"][0] = -8.0  # step 0's probes at tau ~ rho_0 = rho_limit (the grid starts at t_max)
    if method == "adasde":
        raw["gamma"] = np.full_like(raw["gamma"], 50.0)  # gamma = gamma_max
    assert plan.ts[0] == pytest.approx(sde.t_max) and np.isfinite(sde.rho_limit)
    x, key = x_T(), KEY if plan.stochastic else None
    got = sample(plan, eps_fn, x, key, rule_params=RuleParams.for_plan(plan, raw))
    jax.effects_barrier()
    assert max(times) <= sde.t_max * (1 + 1e-12)
    want = reference(plan, raw, x, key, sde, eps)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_neutral_reductions():
    """EPD with K = 1 at its neutral parameters (r = 1/2, w = c = a = 1) is AMED-Solver's
    base step (to float64 rounding); the plugin at order 0 is EPD; AdaSDE with gamma_max = 0
    is EPD with K = 1 (its ODE step), with parameters and without (the plan's table)."""
    x = x_T()
    epd1 = make_plan(SDE, method="epd", nfe=5, afs=True, probes=1)
    base = sample(make_plan(SDE, method="amed", nfe=5, afs=True), EPS, x)
    neutral = RuleParams.for_plan(epd1, epd1.rule.init_params())
    # two plans, two compiled programs over the same float64 step tables: a few ulp (1e-13)
    np.testing.assert_allclose(sample(epd1, EPS, x), base, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(sample(epd1, EPS, x, rule_params=neutral), base, rtol=1e-13)
    plug = make_plan(SDE, method="epd_ipndm", order=0, nfe=5, afs=True, probes=1, grid="linear")
    np.testing.assert_allclose(sample(plug, EPS, x), base, rtol=1e-13, atol=1e-14)
    ode = make_plan(SDE, method="adasde", nfe=5, afs=True, gamma_max=0)
    np.testing.assert_allclose(sample(ode, EPS, x, KEY), base, rtol=1e-13, atol=1e-14)
    raw = ode.rule.init_params()
    np.testing.assert_allclose(
        sample(ode, EPS, x, KEY, rule_params=RuleParams.for_plan(ode, raw)), base, rtol=1e-13
    )


def test_probes_are_one_network_call():
    """Per step: one call on the B-batch (the first stage) and one on the K*B probes (a
    network that takes a time per sample; any other is vmapped over the rows)."""
    shapes = []

    @per_sample_time
    def eps_fn(x, t):
        shapes.append(x.shape)
        return EPS(x, t)

    plan = make_plan(SDE, method="epd", parallel_nfe=5, afs=True, probes=3)
    sample(plan, eps_fn, x_T(batch=5))
    assert sorted(set(shapes)) == [(5, 3), (15, 3)]


def test_nfe_accounting_and_budgets():
    """K = 2: real evaluations 5/8/11/14 at parallel NFE 3/5/7/9 (AFS); a budget is named."""
    for par, real in zip((3, 5, 7, 9), (5, 8, 11, 14), strict=True):
        plan = make_plan(SDE, method="epd", parallel_nfe=par, afs=True)
        assert (plan.nfe, plan.parallel_nfe) == (real, par)
        assert make_plan(SDE, method="epd", nfe=real, afs=True).num_steps == plan.num_steps
    amed = make_plan(SDE, method="amed", nfe=5, afs=True)
    assert amed.parallel_nfe == amed.nfe == 5
    assert make_plan(SDE, method="ipndm", parallel_nfe=6).nfe == 6
    with pytest.raises(solvers.MethodArgumentError, match="parallel_nfe conflicts with nfe"):
        make_plan(SDE, method="epd", nfe=8, parallel_nfe=5, afs=True)
    with pytest.raises(solvers.MethodArgumentError, match="^parallel_nfe must be a budget"):
        make_plan(SDE, method="epd", parallel_nfe=4, afs=True)
    with pytest.raises(solvers.MethodArgumentError, match="options.gamma_max"):
        make_plan(SDE, method="epd", nfe=8, gamma_max=0.01)
    with pytest.raises(solvers.MethodArgumentError, match="options.probes"):
        make_plan(SDE, method="epd", nfe=8, probes=0)


def test_adasde_noise_is_per_sample():
    """The churn noise of sample i depends on (key, i, step) only: a batch split in two (with
    index_offset) or permuted (with sample_index, as a device shard) gives the same rows."""
    plan = make_plan(SDE, method="adasde", nfe=5, afs=True, gamma_max=0.2)
    params = RuleParams.for_plan(plan, plan.rule.init_params(seed=1, init="normal"))
    x = x_T(batch=6)
    whole = sample(plan, EPS, x, KEY, rule_params=params)
    parts = [sample(plan, EPS, x[:2], KEY, rule_params=params),
             sample(plan, EPS, x[2:], KEY, index_offset=2, rule_params=params)]  # fmt: skip
    np.testing.assert_allclose(jnp.concatenate(parts), whole, rtol=1e-13)
    perm = jnp.array([4, 0, 5, 2, 1, 3])
    shuffled = sample(plan, EPS, x[perm], KEY, sample_index=perm, rule_params=params)
    np.testing.assert_allclose(shuffled, whole[perm], rtol=1e-13)
    other = sample(plan, EPS, x, jax.random.PRNGKey(8), rule_params=params)
    assert float(jnp.min(jnp.abs(other - whole))) > 0  # the key matters, in every row
    with pytest.raises(ValueError, match="stochastic: pass a PRNG key"):
        sample(plan, EPS, x, rule_params=params)


def test_params_refused_for_other_plans():
    """Tables trained for one plan are refused, naming the setting, on another."""
    plan = make_plan(SDE, method="epd", parallel_nfe=5, afs=True)
    params = RuleParams.for_plan(plan, plan.rule.init_params())
    for other, field in (
        (make_plan(SDE, method="epd", parallel_nfe=7, afs=True), "nfe"),
        (make_plan(SDE, method="epd_ipndm", parallel_nfe=5, afs=True, grid="linear"), "method"),
        (make_plan(SDE, method="epd", parallel_nfe=5, afs=True, probes=3, grid="linear"),
         "probes"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            sample(other, EPS, x_T(), rule_params=params)
