"""deis_jax: fast sampling of diffusion models in JAX (DEIS and the samplers it is judged
against).

    import deis_jax as deis
    sde = deis.VPSDE.linear(beta_min=0.1, beta_max=20.0)
    eps_fn = deis.GaussianMixture.ring().eps_fn(sde)  # or eps_fn_from_model(network, sde)
    sample = deis.get_sampler(sde, eps_fn, method="tab", order=3, nfe=10)
    x0 = jax.jit(sample)(x_T)

    fitted = deis.fit_sampler(sde, eps_fn, x_T, nfe=5, model_id="my-model")  # fitted sampler:
    x0 = fitted.sample(eps_fn, x_new)     # the best recipe on validation; fitted.save(path)

    plan = deis.make_plan(sde, method="ipndm", order=3, nfe=5)   # no model: the network is
    x0 = jax.jit(deis.sample, static_argnums=0)(plan, eps_fn, x_T)  # an argument at call time
    grid = deis.optimize_grid(sde, eps_fn, x_T, method="ipndm", order=3, nfe=5)  # fitted grid
    plan = deis.make_plan(sde, method="amed_ipndm", nfe=5, afs=True)   # AMED-Plugin: train its
    fit = deis.fit_amed(plan, eps_fn, deis.amed_teacher(plan, eps_fn, x_T, path=..., model_id=...))
    x0 = deis.sample(plan, eps_fn, x_T, rule_params=fit.params)      # predictor, then sample

The top level re-exports the sampling core (``deis_jax.sampling``), grid fitting
(``deis_jax.fitting``) and the analytic test distributions (``deis_jax.evaluation.analytic``);
networks, training and evaluation are imported from their subpackages.
"""

from deis_jax.evaluation.analytic import GaussianMixture
from deis_jax.fitting import (
    AmedPredictorFile,
    FittedSampler,
    OptimizedGrid,
    amed_teacher,
    fit_amed,
    fit_sampler,
    optimize_grid,
)
from deis_jax.sampling.coefficients import (
    RK_TABLEAUS,
    adams_bashforth_eps_coefficients,
    ddim_coefficients,
    polynomial_eps_coefficients,
    rk_rho_coefficients,
)
from deis_jax.sampling.diagnostics import NonFiniteSamplesError, nonfinite_samples
from deis_jax.sampling.rule_params import RuleParams
from deis_jax.sampling.sampler import (
    Sampler,
    SamplingPlan,
    first_nonfinite_step,
    get_sampler,
    make_plan,
    run_table,
    sample,
)
from deis_jax.sampling.sde import (
    VESDE,
    VPSDE,
    DiscreteVPSDE,
    EDMSchedule,
    NoiseSchedule,
    SubVPSDE,
    get_sde,
)
from deis_jax.sampling.solvers import (
    MethodArgumentError,
    MethodSpec,
    StepTable,
    get_method,
    method_names,
    register_method,
)
from deis_jax.sampling.timesteps import GRID_KINDS, time_grid
from deis_jax.sampling.wrappers import (
    EpsFn,
    eps_fn_from_model,
    guided_eps_fn,
    output_to_eps,
    per_sample_time,
)

__all__ = [
    "AmedPredictorFile",
    "GRID_KINDS",
    "RK_TABLEAUS",
    "DiscreteVPSDE",
    "EDMSchedule",
    "EpsFn",
    "FittedSampler",
    "GaussianMixture",
    "MethodArgumentError",
    "MethodSpec",
    "NoiseSchedule",
    "NonFiniteSamplesError",
    "OptimizedGrid",
    "RuleParams",
    "Sampler",
    "SamplingPlan",
    "StepTable",
    "SubVPSDE",
    "VESDE",
    "VPSDE",
    "adams_bashforth_eps_coefficients",
    "amed_teacher",
    "ddim_coefficients",
    "eps_fn_from_model",
    "first_nonfinite_step",
    "fit_amed",
    "fit_sampler",
    "get_method",
    "get_sampler",
    "get_sde",
    "guided_eps_fn",
    "make_plan",
    "method_names",
    "nonfinite_samples",
    "optimize_grid",
    "output_to_eps",
    "per_sample_time",
    "polynomial_eps_coefficients",
    "register_method",
    "rk_rho_coefficients",
    "run_table",
    "sample",
    "time_grid",
]
