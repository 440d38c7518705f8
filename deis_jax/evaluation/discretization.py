"""Discretisation error of samplers against a reference solve, for any ``eps_fn``.

The probability-flow ODE defines a deterministic map ``x_T -> x_0`` for *any* model -- an
analytic score or a trained network -- so a deterministic sampler's error is measurable
without data: run it and a high-accuracy solve from the same ``x_T`` and take the RMS
difference (over samples and dimensions). The reference is
``deis_jax.evaluation.reference.reference_solve`` (RK4 in rho on a log-SNR grid, validated by
step doubling: ``ReferenceSolve.error_estimate``); it is trustworthy when that estimate is far below
the errors it measures -- ``DiscretizationResult.reference_ok`` checks a factor of 10.

When a sampler ends with the Tweedie denoising step (``final_denoise``), the same step is
applied to the reference, so both sides compare the same quantity.

    result = discretization_errors(schedule, eps_fn, x_T, ["ddim", "tab3"], [5, 10, 20])
    result.records  # [{'method': 'ddim', 'nfe_budget': 5, 'nfe': 5, 'rmse': ...}, ...]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from deis_jax.evaluation.metrics import rmse
from deis_jax.evaluation.reference import ReferenceSolve, reference_solve
from deis_jax.sampling.method_spec import MethodChoice, parse_method_spec
from deis_jax.sampling.sampler import Sampler, get_sampler, run_table
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.sampling.wrappers import EpsFn


@dataclasses.dataclass
class DiscretizationResult:
    records: list[dict[str, Any]]
    reference: ReferenceSolve

    @property
    def reference_ok(self) -> bool:
        """True when the reference error estimate is 10x below every measured error."""
        errors = [r["rmse"] for r in self.records if r["rmse"] is not None]
        return not errors or self.reference.error_estimate < 0.1 * min(errors)


def reference_output(sampler: Sampler, reference: ReferenceSolve, labels=None) -> np.ndarray:
    """The reference endpoint, passed through the sampler's final denoise step if it has one
    (``labels``: the rows' classes, a class-conditional network)."""
    if sampler.final_table is None:
        return reference.x0
    x = jax.numpy.asarray(reference.x0)
    out = jax.jit(lambda x, c: run_table(sampler.eps_fn, sampler.final_table, x, labels=c))(
        x, labels
    )
    return np.asarray(out, np.float64)


def sampler_rmse(sampler: Sampler, x_T, reference: ReferenceSolve, output=None) -> float | None:
    """RMSE of ``sampler(x_T)`` (or of a given ``output`` for the same ``x_T``) against the
    reference; None for stochastic samplers (they do not solve the ODE)."""
    if sampler.stochastic:
        return None
    out = jax.jit(sampler)(x_T) if output is None else output
    return rmse(np.asarray(out, np.float64), reference_output(sampler, reference))


def discretization_errors(
    schedule: NoiseSchedule,
    eps_fn: EpsFn,
    x_T,
    methods: Sequence[str | MethodChoice],
    nfes: Sequence[int],
    *,
    t0: float | None = None,
    t1: float | None = None,
    reference_steps: int = 250,
    reference: ReferenceSolve | None = None,
    **sampler_kwargs: Any,
) -> DiscretizationResult:
    """RMSE vs the reference solve for every method spec x NFE (deterministic methods).

    ``methods``: ``deis_jax.sampling.method_spec`` strings (``"tab3"``,
    ``"rhork:tableau=kutta3"``) or parsed ``MethodChoice``; ``sampler_kwargs`` go to
    ``get_sampler`` (``grid``, ``grid_power``, ``final_denoise``). Stochastic methods get
    ``rmse=None``. ``[t0, t1]`` defaults to ``schedule.interval()``.
    """
    t0, t1 = schedule.interval(t0, t1)
    if reference is None:
        reference = reference_solve(schedule, eps_fn, x_T, t0=t0, t1=t1, steps=reference_steps)
    records = []
    for method in methods:
        choice = parse_method_spec(method) if isinstance(method, str) else method
        for nfe in nfes:
            sampler = get_sampler(
                schedule,
                eps_fn,
                method=choice.method,
                order=choice.order,
                nfe=nfe,
                t0=t0,
                t1=t1,
                **sampler_kwargs,
                **choice.options,
            )
            records.append(
                {
                    "method": choice.label,
                    "nfe_budget": int(nfe),
                    "nfe": sampler.nfe,
                    "rmse": sampler_rmse(sampler, x_T, reference),
                }
            )
    return DiscretizationResult(records, reference)
