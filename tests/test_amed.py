"""AMED-Solver / AMED-Plugin: the step rule against an independent reimplementation, the
base-solver identities, the exact Gaussian step and the NFE accounting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq

from deis_jax.sampling import solvers
from deis_jax.sampling.amed_predictor import StepwisePredictor
from deis_jax.sampling.coefficients import ADAMS_BASHFORTH
from deis_jax.sampling.rule_params import RuleParams
from deis_jax.sampling.sampler import make_plan, sample
from deis_jax.sampling.sde import VESDE, VPSDE

SDE = VPSDE()
MU, S2 = 0.3, 0.25  # isotropic Gaussian data N(MU, S2 I)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def gaussian_eps(schedule):
    """The exact eps of N(MU, S2 I) data (scalar or per-sample t)."""

    def eps_fn(x, t):
        t = jnp.asarray(t)
        shape = (-1,) + (1,) * (x.ndim - 1) if t.ndim else ()
        a, s = (jnp.reshape(v, shape) for v in (schedule.alpha(t), schedule.sigma(t)))
        return s * (x - a * MU) / (a**2 * S2 + s**2)

    return eps_fn


def mixture_eps(schedule):
    """Exact eps of a two-component 1-D mixture per dimension (a curved trajectory)."""
    means, var = jnp.array([-0.8, 0.5]), 0.05

    def eps_fn(x, t):
        t = jnp.asarray(t)
        shape = (-1,) + (1,) * (x.ndim - 1) if t.ndim else ()
        a, s = (jnp.reshape(v, shape) for v in (schedule.alpha(t), schedule.sigma(t)))
        a, s = a[..., None], s[..., None]
        tot = a**2 * var + s**2
        logw = -0.5 * (x[..., None] - a * means) ** 2 / tot
        w = jax.nn.softmax(logw, axis=-1)
        return jnp.sum(w * s * (x[..., None] - a * means) / tot, axis=-1)

    return eps_fn


def reference_amed(schedule, method, ts, eps_fn, x, r, c, a, order=3, afs=False):
    """The AMED step rules of the spec written directly in v = x/alpha, rho = sigma/alpha
    (EDM variables), with an explicit buffer of directions -- no step table involved.
    ``r, c, a``: arrays of shape (N,) (one value per step)."""
    rho = np.asarray(schedule.rho(ts))
    alpha = np.exp(np.asarray(schedule.log_alpha(ts)))

    def d(v, rho_net):
        t = schedule.t_from_rho(jnp.asarray(rho_net))
        return eps_fn(jnp.exp(schedule.log_alpha(t)) * v, t)

    def ab(buffer):
        q = min(order, len(buffer) - 1)
        return sum(w * buffer[-1 - j] for j, w in enumerate(ADAMS_BASHFORTH[q]))

    v = x / alpha[0]
    buffer = []
    for k in range(len(ts) - 1):
        t_c, t_x = rho[k], rho[k + 1]
        d_c = v / np.sqrt(1 + t_c**2) if (afs and k == 0) else d(v, t_c)
        s = t_x ** r[k] * t_c ** (1 - r[k])
        if method == "amed_ipndm":
            buffer.append(d_c)
            y = v + (s - t_c) * ab(buffer)
        else:
            y = v + (s - t_c) * d_c
        d_s = a[k] * d(y, a[k] * s)
        if method == "amed":
            v = v + c[k] * (t_x - t_c) * d_s
        elif method == "amed_ddim":
            v = y + c[k] * (t_x - s) * d_s
        elif method == "amed_dpm":
            v = v + c[k] * (t_x - t_c) * ((1 - 1 / (2 * r[k])) * d_c + d_s / (2 * r[k]))
        else:
            buffer.append(d_s)
            v = y + c[k] * (t_x - s) * ab(buffer)
    return alpha[-1] * v


def stepwise_params(r, c, a, scale_dir, scale_time):
    """StepwisePredictor parameters giving exactly ``r, c, a`` per step."""
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    params = {"r_logit": jnp.asarray(logit(r))}
    if scale_dir:
        params["c_logit"] = jnp.asarray(logit((c - 1 + scale_dir) / (2 * scale_dir)))
    if scale_time:
        params["a_logit"] = jnp.asarray(logit((a - 1 + scale_time) / (2 * scale_time)))
    return params


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["amed", "amed_dpm"])
def test_half_ratio_is_dpm_solver_2(method):
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 5), jnp.float64)
    plan = make_plan(SDE, method=method, nfe=8)
    dpm2 = make_plan(SDE, plan.ts, method="dpm2")
    for field in plan.table._fields:
        np.testing.assert_allclose(getattr(plan.table, field), getattr(dpm2.table, field),
                                   rtol=1e-13, atol=1e-15, err_msg=field)  # fmt: skip
    eps_fn = mixture_eps(SDE)
    want = sample(dpm2, eps_fn, x)
    np.testing.assert_allclose(sample(plan, eps_fn, x), want, rtol=1e-12, atol=1e-13)
    # the same through the device rule with a predictor that outputs r = 1/2, c = a = 1
    plan = make_plan(SDE, plan.ts, method=method, predictor="stepwise", scale_dir=0.01,
                     scale_time=0.2)  # fmt: skip
    params = stepwise_params(np.full(4, 0.5), np.ones(4), np.ones(4), 0.01, 0.2)
    got = jax.jit(lambda p: sample(plan, eps_fn, x, rule_params=RuleParams.for_plan(plan, p)))(
        params
    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.numerics
@pytest.mark.parametrize("method", solvers.amed.AMED_METHODS)
@pytest.mark.parametrize("afs", [False, True])
def test_rule_matches_direct_implementation(method, afs):
    """Random per-step r, c, a through the table + rule = the spec's rules written out."""
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 4), jnp.float64)
    nfe = 9 if afs else 10  # 5 steps either way
    plan = make_plan(SDE, method=method, nfe=nfe, afs=afs, predictor="stepwise", scale_dir=0.05,
                     scale_time=0.2)  # fmt: skip
    n = plan.num_steps
    rng = np.random.default_rng(0)
    r, c, a = rng.uniform(0.2, 0.8, n), rng.uniform(0.96, 1.04, n), rng.uniform(0.85, 1.15, n)
    eps_fn = mixture_eps(SDE)
    params = RuleParams.for_plan(plan, stepwise_params(r, c, a, 0.05, 0.2))
    got = sample(plan, eps_fn, x, rule_params=params)
    want = reference_amed(SDE, method, plan.ts, eps_fn, x, r, c, a, afs=afs)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.numerics
@pytest.mark.parametrize("order", [0, 1, 2])
def test_ipndm_plugin_orders(order):
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 4), jnp.float64)
    plan = make_plan(SDE, method="amed_ipndm", order=order, nfe=10)
    n = plan.num_steps
    assert plan.table.history == order
    want = reference_amed(SDE, "amed_ipndm", plan.ts, mixture_eps(SDE), x, np.full(n, 0.5),
                          np.ones(n), np.ones(n), order=order)  # fmt: skip
    np.testing.assert_allclose(sample(plan, mixture_eps(SDE), x), want, rtol=1e-11, atol=1e-12)


@pytest.mark.numerics
def test_gaussian_optimal_ratio_is_exact():
    """For isotropic Gaussian data one AMED step with the right r (c = a = 1) is exact: the
    trajectory v(rho) = MU + (v_c - MU) sqrt((S2 + rho^2)/(S2 + rho_c^2)) is a straight line.
    On EDM's time-uniform N = 4 grid (80, 6.95, 1.29, 0.002; data std 0.5) r* is 0.428,
    0.424, 0.133 (amed_ersde.md section 1.1)."""
    ve = VESDE(sigma_min=0.001, sigma_max=100.0)
    rho = np.array([80.0, 6.950235, 1.286669, 0.002])
    ts = np.asarray(ve.t_from_rho(rho))
    global MU, S2
    old = MU, S2
    MU, S2 = 0.0, 0.25
    try:

        def gain(r, rc, rx):  # (v_x - MU)/(v_c - MU) of one AMED-Solver step
            rs = rx**r * rc ** (1 - r)
            y = 1 + (rs - rc) * rc / (S2 + rc**2)
            return 1 + (rx - rc) * rs / (S2 + rs**2) * y

        exact = [
            np.sqrt((S2 + rx**2) / (S2 + rc**2)) for rc, rx in zip(rho[:-1], rho[1:], strict=True)
        ]
        ends = zip(rho[:-1], rho[1:], exact, strict=True)
        r_star = np.array([brentq(lambda r, rc=rc, rx=rx, e=e: gain(r, rc, rx) - e, 1e-6,
                                  1 - 1e-6, xtol=1e-15) for rc, rx, e in ends])  # fmt: skip
        np.testing.assert_allclose(r_star, [0.428, 0.424, 0.133], atol=1e-3)
        plan = make_plan(ve, ts, method="amed", predictor="stepwise", scale_dir=0.0)
        x = 80.0 * jax.random.normal(jax.random.PRNGKey(3), (4, 6), jnp.float64)
        params = RuleParams.for_plan(plan, stepwise_params(r_star, 1, 1, 0, 0))
        out = sample(plan, gaussian_eps(ve), x, rule_params=params)
        want = x * np.prod(exact)
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-10)
        # r = 1/2 is far from exact on the last step
        half = sample(plan, gaussian_eps(ve), x)
        assert np.max(np.abs(half - want)) > 1e-2
    finally:
        MU, S2 = old


@pytest.mark.parametrize(
    "nfe, afs, steps",
    [(3, True, 2), (5, True, 3), (7, True, 4), (9, True, 5), (4, False, 2), (6, False, 3)],
)
def test_nfe_accounting(nfe, afs, steps):
    """NFE = 2N - [AFS] for N steps (an odd budget needs AFS: ``test_samplers`` checks that
    the others are refused); the network is called exactly that often per sample."""
    plan = make_plan(SDE, method="amed", nfe=nfe, afs=afs)
    assert plan.num_steps == steps
    assert plan.nfe == 2 * steps - afs
    calls = []
    base = mixture_eps(SDE)

    def counting_eps(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return base(x, t)

    jax.block_until_ready(sample(plan, counting_eps, jnp.ones((2, 3))))
    assert len(calls) == plan.nfe


def test_afs_first_direction():
    """AFS uses eps = x / sqrt(alpha^2 + sigma^2) at t1 instead of a network call: a network
    that is NaN at t1 gives finite samples with AFS only."""
    base = mixture_eps(SDE)
    t1 = SDE.default_t1

    def nan_at_t1(x, t):
        return jnp.where(jnp.asarray(t) >= t1, jnp.nan, 1.0) * base(x, t)

    x = jax.random.normal(jax.random.PRNGKey(4), (3, 2), jnp.float64)
    plan = make_plan(SDE, method="ipndm", nfe=5, afs=True)
    assert plan.num_steps == 6 and plan.nfe == 5
    assert np.all(np.isfinite(sample(plan, nan_at_t1, x)))
    assert not np.all(np.isfinite(sample(make_plan(SDE, plan.ts, method="ipndm"), nan_at_t1, x)))
    assert plan.first_eps_scale == pytest.approx(
        1 / np.sqrt(SDE.alpha(np.float64(t1)) ** 2 + SDE.sigma(np.float64(t1)) ** 2)
    )


def test_options_validated():
    with pytest.raises(ValueError, match="options.predictor must be one of"):
        make_plan(SDE, method="amed", nfe=5, predictor="mlp")
    with pytest.raises(ValueError, match="options.scale_time must be a number in"):
        make_plan(SDE, method="amed", nfe=5, scale_time=1.5)
    with pytest.raises(ValueError, match="afs must be True or False"):
        make_plan(SDE, method="amed", nfe=5, afs="yes")
    with pytest.raises(ValueError, match="afs is for deterministic methods"):
        make_plan(SDE, method="sddim", nfe=5, afs=True)
    with pytest.raises(ValueError, match="has no learned rule"):
        sample(make_plan(SDE, method="tab", nfe=5), mixture_eps(SDE), jnp.ones((1, 2)),
               rule_params={})  # fmt: skip


def test_stepwise_predictor_shape():
    plan = make_plan(SDE, method="amed", nfe=5, afs=True, predictor="stepwise")
    assert isinstance(plan.rule.predictor, StepwisePredictor)
    assert plan.rule.predictor.num_steps == plan.num_steps
    assert not plan.rule.needs_features


def test_bottleneck_predictor_through_the_loop():
    """The paper's predictor on a (tiny, random) DDPM++: it reads the network's bottleneck
    feature inside the one sampling loop (zeros on the AFS step); with zero weights it is the
    base solver; gradients reach its weights through the samples."""
    import functools

    from deis_jax.fitting.amed import init_params
    from deis_jax.models.score_sde import get_model, get_model_config
    from deis_jax.models.score_sde.family import apply_for_sampling
    from deis_jax.sampling.wrappers import eps_fn_from_model

    config = get_model_config("vp_cifar10_ddpmpp_continuous")
    # no attention in the down/up levels (the middle block keeps its own): the predictor reads
    # the 4x4 bottleneck all the same, and the gradient program compiles ~15% faster
    config.update(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=8)
    model = get_model(config)
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 8, 8, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.ones(3)))["params"]
    rng = np.random.default_rng(0)
    net = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), jnp.float32),
                       shapes)  # fmt: skip
    apply = functools.partial(apply_for_sampling, model)
    eps_fn = eps_fn_from_model(jax.tree_util.Partial(apply, net), SDE, "eps")
    plan = make_plan(SDE, method="amed_ipndm", nfe=5, afs=True, scale_time=0.2)
    assert plan.rule.needs_features
    params = init_params(plan, eps_fn, x)
    # 16 features (the 4x4 bottleneck): 72 + (16*128 + 128) + (128*4 + 4) + 3 heads * 21
    assert sum(p.size for p in jax.tree.leaves(params)) == 72 + 2176 + 516 + 63

    def loss(p):
        out = sample(plan, eps_fn, x, rule_params=RuleParams.for_plan(plan, p))
        return jnp.mean(out**2), out

    # one compiled program gives the samples and the gradients, at zero and random weights
    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    base = sample(plan, eps_fn, x)
    zero = jax.tree.map(jnp.zeros_like, params)
    np.testing.assert_allclose(run(zero)[0][1], base, rtol=1e-5, atol=1e-5)
    (_, out), grads = run(params)
    assert np.all(np.isfinite(out)) and np.max(np.abs(out - base)) > 1e-4
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.any(grads["feat_hidden"]["kernel"] != 0)  # the feature reaches the loss
