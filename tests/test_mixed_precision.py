"""Mixed precision (issue 23): bfloat16 / float16 networks with float32 parameters and a
float32 sampler state (``deis_jax.common.precision``).

float32 stays bit-identical by construction (every helper is the identity at float32) and by
the fixture tests of both families (tests/test_models.py, tests/test_edm_networks.py), which
run the default dtype unchanged.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from edm_fixture_models import small_model, small_params

import deis_jax as deis
from configs import edm_cifar10_vp, edm_imagenet64_cond, vpsde_cifar10, vpsde_digits
from deis_jax.common.checks import ConfigError
from deis_jax.common.precision import cast_params, check_state_dtype
from deis_jax.experiments import train as train_mode
from deis_jax.models import family_of, loading
from deis_jax.models.score_sde import get_model, init_params
from deis_jax.models.score_sde.family import model_config
from deis_jax.sampling.sampler import make_plan, sample
from deis_jax.sampling.solvers import method_names
from deis_jax.sampling.wrappers import model_argument
from deis_jax.training import loop as training

# bfloat16 keeps 8 significant bits: one rounding is <= 2^-9 relative; a few-layer network's
# output error is a few times that (errors of independent roundings add in quadrature).
BF16_NET_RTOL = 0.05

# one resolution level: residual blocks, attention, GroupNorm, the time embedding
SMALL_DDPMPP = dict(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)


def _ops(jaxpr, names):
    """The equations named ``names`` in ``jaxpr`` and the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _ops(inner, names)


def _operand_dtypes(fn, *args, names=("conv_general_dilated", "dot_general")):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in _ops(jaxpr, names)]


def _max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# --- the networks compute in the compute dtype, their output is float32 ---------------------


def test_score_sde_network_in_bfloat16_runs_every_matmul_in_bfloat16():
    """From a config: ``config.model.dtype='bfloat16'`` gives a network whose convolutions
    and matmuls all take bfloat16 operands, called by the family's ``model_fn`` with a
    bfloat16 copy of the float32 parameters, returning float32 close to the float32 model."""
    config = vpsde_digits.get_config()
    config.model.update(SMALL_DDPMPP)
    config.data.image_size = 4
    family = family_of(config)
    net32 = family.build(config)
    params = init_params(model_config(config), jax.random.PRNGKey(0))
    assert cast_params(params, "float32") is params  # float32: the stored tree itself
    config.model.dtype = "bfloat16"
    net16 = family.build(config)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 1), jnp.float32)
    t = jnp.array([5.0, 500.0])
    fn16 = family.model_fn(config, net16, params, None)
    fn32 = family.model_fn(config, net32, params, None)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(fn16))  # cast once, here
    dtypes = _operand_dtypes(fn16, x, t)
    assert dtypes and all(set(d) == {"bfloat16"} for d in dtypes), dtypes
    out16, out32 = jax.jit(fn16)(x, t), jax.jit(fn32)(x, t)
    assert out16.dtype == jnp.float32
    assert 1e-4 < _max_rel(out16, out32) < BF16_NET_RTOL  # rounded, not wrong


@pytest.mark.parametrize(
    "name, dtype, floor",
    [
        ("cifar10_uncond_vp", "bfloat16", 1e-4),
        # the ADM model EDM publishes with use_fp16=True, in float16 (11 significant bits)
        pytest.param("imagenet64_cond_adm", "float16", 1e-5, marks=pytest.mark.slow),
    ],
)
def test_edm_network_in_low_precision_runs_its_convolutions_in_it(name, dtype, floor):
    """EDM's fp16 path: the U-Net in the low precision, the attention logits and softmax and
    the preconditioning in float32 (the fixture models, EDM's own weights at small size)."""
    m = small_model(name)
    params = small_params(name)
    res, ch = m.net.img_resolution, m.net.img_channels
    x = jax.random.normal(jax.random.PRNGKey(1), (2, res, res, ch), jnp.float32) * 5.0
    sigma = jnp.array([0.05, 20.0])

    def apply(p):
        return jax.jit(lambda x, s: m.net.apply({"params": p}, x, s))

    low = cast_params(params, dtype)
    convs = _operand_dtypes(apply(low), x, sigma, names=("conv_general_dilated",))
    assert convs and all(set(d) == {dtype} for d in convs), convs
    out, want = apply(low)(x, sigma), apply(params)(x, sigma)
    assert out.dtype == jnp.float32
    # D = c_skip x + c_out F: relative to the F part (x - D for VP), not to D
    assert floor < _max_rel(out - x, want - x) < BF16_NET_RTOL


# --- the sampler: a float32 state with a bfloat16 eps; a bfloat16 state is refused ----------

SDE = deis.VPSDE.linear()
MIXTURE = deis.GaussianMixture.ring()
X_T = jax.random.normal(jax.random.PRNGKey(0), (64, 2), jnp.float32)
RUN = jax.jit(sample, static_argnums=0)


def _deterministic_plans(nfe: int):
    for name in method_names():
        if name.startswith("amed"):  # a learned rule: sampled in tests/test_amed.py
            continue
        plan = make_plan(SDE, method=name, nfe=nfe, nfe_rounding="up")
        if not plan.stochastic:
            yield name, plan


def test_bfloat16_eps_with_a_float32_state_gives_finite_accurate_samples():
    """Every deterministic method at NFE 3 to 50 gives finite samples with a bfloat16 eps;
    at NFE 50 they are within a few bfloat16 roundings of the float32-eps samples (the state,
    its updates and the float64 host coefficients are not rounded to bfloat16). At NFE 3
    the coarse steps of this sharp mixture amplify any perturbation near the modes'
    boundaries, so there only finiteness is asserted. (NFE 10 runs in the docs table.)"""
    eps32 = MIXTURE.eps_fn(SDE)
    eps16 = model_argument(lambda x, t: eps32(x, t).astype(jnp.bfloat16))
    eps32_arg = model_argument(eps32)
    names = set()
    for nfe in (3, 50):
        for name, plan in _deterministic_plans(nfe):
            names.add(name)
            low = RUN(plan, eps16, X_T)
            assert low.dtype == jnp.float32
            assert np.isfinite(np.asarray(low)).all(), (name, nfe)
            if nfe == 50:
                moved = np.linalg.norm(np.asarray(low - RUN(plan, eps32_arg, X_T)), axis=1)
                # one rounding moves eps by <= 2^-9 relative, |x_0| ~ 1.6: ~3e-3 at most per
                # call, damped along the trajectory (measured: medians <= 6e-4)
                assert np.median(moved) < 2e-3, (name, np.median(moved))
    assert {"ddim", "tab", "ipndm", "dpmpp", "unipc", "rhork"} <= names


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_state_is_refused(dtype):
    plan = make_plan(SDE, method="tab", order=3, nfe=10)
    with pytest.raises(TypeError, match=r"state \(x_T\) must be float32 or float64"):
        RUN(plan, model_argument(MIXTURE.eps_fn(SDE)), X_T.astype(dtype))
    check_state_dtype(jnp.float32)  # float32 / float64 pass
    check_state_dtype(jnp.float64)


# --- configs: validated at start-up, EDM's use_fp16 honoured ---------------------------------


@pytest.mark.parametrize("module", [vpsde_digits, edm_cifar10_vp])
@pytest.mark.parametrize("bad", ["float64", "int8", "bf16"])
def test_bad_model_dtype_is_refused_by_name(module, bad):
    config = module.get_config()
    config.model.dtype = bad
    with pytest.raises(ConfigError, match=r"model\.dtype must be one of .*'bfloat16'"):
        loading.validate_model_and_data(config)


def test_edm_use_fp16_sets_the_default_compute_dtype():
    assert edm_imagenet64_cond.get_config().model.dtype == "float16"  # use_fp16=True
    assert edm_cifar10_vp.get_config().model.dtype == "float32"
    from deis_jax.models.edm.family import compute_dtype

    config = edm_imagenet64_cond.get_config()
    del config.model["dtype"]  # a config without the field: EDM's rule
    assert compute_dtype(config) == "float16"


# --- training: float32 master weights, the forward pass in bfloat16 --------------------------


def test_bfloat16_training_keeps_float32_master_weights():
    values = dict(SMALL_DDPMPP, name="ncsnpp", centered=True, image_size=4, num_channels=1)
    net32 = get_model(values)
    net16 = get_model(dict(values, dtype="bfloat16"))
    tx = training.make_optimizer(lr=1e-3, warmup=0)
    state = training.init_state(net16, tx, jax.random.PRNGKey(0), (4, 4, 1))
    batch = jax.random.normal(jax.random.PRNGKey(2), (4, 4, 4, 1))
    losses = {}
    for name, net in (("bf16", net16), ("f32", net32)):
        step = jax.jit(training.make_train_step(net, SDE, tx, prediction="eps", seed=0))
        new, metrics = step(state, batch)
        losses[name] = float(metrics["grad_norm"])
        for tree in (new.params, new.ema_params):  # the master weights and their average
            assert jax.tree.map(lambda a: a.dtype, tree) == jax.tree.map(
                lambda a: a.dtype, state.params
            )  # as initialised (float32; NIN's under x64 float64), never the compute dtype
        assert np.isfinite(losses[name])
    # the same weights, noise and batch: the gradients differ only by bfloat16 rounding (the
    # loss barely moves: the last layers start at ~0, so the output is ~0 in both)
    assert 1e-4 < abs(losses["bf16"] - losses["f32"]) / losses["f32"] < BF16_NET_RTOL


def test_float16_training_is_refused():
    config = vpsde_digits.get_config()
    config.model.dtype = "float16"
    with pytest.raises(ConfigError, match=r"model\.dtype='float16' is not trainable"):
        train_mode.validate(config)
    config.model.dtype = "bfloat16"
    train_mode.validate(config)


def test_configs_declare_the_dtype_field_float32_by_default():
    """Every image config has ``model.dtype`` (so that ``--config.model.dtype=bfloat16``
    overrides it), float32 unless the network is EDM's ``use_fp16`` one."""
    for module in (vpsde_digits, vpsde_cifar10, edm_cifar10_vp):
        config = module.get_config()
        assert isinstance(config.model, ml_collections.ConfigDict)
        assert config.model.dtype == "float32"


def test_float32_runs_keep_the_identities_they_had_before_the_dtype_field():
    """Checkpoints and cached cells record ``config.model``: float32 (the default) is left
    out so that they still match; a low precision is recorded (it changes the results)."""
    config = vpsde_digits.get_config()
    recorded = train_mode.identity(config)["model"]
    assert "dtype" not in recorded and recorded["nf"] == config.model.nf
    config.model.dtype = "bfloat16"
    assert train_mode.identity(config)["model"]["dtype"] == "bfloat16"


def test_conversion_records_edm_compute_dtype(tmp_path):
    """Converted EDM checkpoints store float32 parameters and the compute dtype of EDM's
    ``use_fp16``."""
    from deis_jax.models.edm.convert import convert_state_dict, load_params_of

    m = small_model("cifar10_uncond_vp")
    kwargs = dict(m.meta["constructor_kwargs"], use_fp16=True)
    meta = convert_state_dict(m.meta["precond_class"], kwargs, {}, m.state_dict, tmp_path / "c")
    assert meta["compute_dtype"] == "float16"
    params = load_params_of(m.net, tmp_path / "c")
    assert {np.asarray(a).dtype for a in jax.tree.leaves(params)} == {np.dtype(np.float32)}
