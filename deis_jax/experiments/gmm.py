"""The Gaussian-mixture problem: samplers measured against an exact score and a reference solve.

This is the embedded job of ``--mode=compare`` and the ``"gmm"`` evaluator of ``--mode=sweep``;
both build the problem and run a cell through the functions here, so the same config gives the
same numbers in both.

* **Problem** (:func:`gmm_problem`). For a data dimension ``dim``: the mixture
  (:func:`mixture_for_dim`: the 2-D ring for dim 2, an embedded low-dimensional mixture
  otherwise), ``compare.num_samples`` prior draws ``x_T`` and as many exact data draws (keys
  from ``seed + dim``), and a reference solve of the probability-flow ODE from ``x_T`` over the
  sampler's interval (RK4 in rho, validated by step doubling, see
  :mod:`deis_jax.evaluation.reference`).
* **Cell** (:func:`run_cell`). One sampler run on ``x_T``, sharded over a ``('data',)`` mesh,
  measured by :func:`cell_metrics`: ``rmse`` against the reference (deterministic samplers
  only) and ``nll_gap``, the excess NLL per dimension under the true density relative to exact
  data draws (any sampler).
* **Report** (:func:`write_report`). The comparison's rows (one per cell, plus
  :func:`reference_record` per dim) as ``results.csv``, ``results.md`` (RMSE and NLL-gap tables,
  method x NFE budget), ``error_vs_nfe.png`` and ``samples_2d.png``; :func:`check_references`
  warns when a reference is not 100x more accurate than the errors measured against it.

Config fields read (checked by :func:`validate_problem`): ``sde``, ``sampler``, ``seed``,
``data.{name="gmm", dims, num_components, latent_dim, radius, std, ring_std}`` and
``compare.{num_samples, reference_steps, x64}``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from deis_jax.common import checks as cv
from deis_jax.common import parallel
from deis_jax.common.files import atomic_write_text
from deis_jax.common.identity import fingerprint
from deis_jax.common.reporting import (
    markdown_table,
    pivot,
    plot_metric_vs_nfe,
    plot_scatter_grid,
    write_csv,
)
from deis_jax.evaluation.analytic import GaussianMixture
from deis_jax.evaluation.metrics import nll_gap, rmse
from deis_jax.evaluation.reference import ReferenceSolve, reference_solve
from deis_jax.experiments import build, validation
from deis_jax.experiments.engine import FAILED, nonfinite_reason
from deis_jax.sampling import sharded
from deis_jax.sampling.diagnostics import nonfinite_samples
from deis_jax.sampling.sampler import Sampler
from deis_jax.sampling.sde import NoiseSchedule


def validate_problem(config) -> NoiseSchedule:
    """Check every field the problem reads (``ConfigError`` naming the field); returns the
    schedule of ``config.sde``."""
    schedule = validation.validate_sde(config)
    validation.validate_sampler(config, schedule)
    cv.require_seed(config)
    cv.require_choice(config, "data.name", ("gmm",))
    cv.require_int_list(config, "data.dims", minimum=1)
    cv.require_number(config, "data.num_components", integer=True, minimum=1)
    cv.require_number(config, "data.latent_dim", integer=True, minimum=1)
    for field in ("data.radius", "data.std", "data.ring_std"):
        cv.require_number(config, field, minimum=0, exclusive_minimum=True)
    if config.data.get("scattered") is not None:
        if list(config.data.scattered.dims):
            cv.require_int_list(config, "data.scattered.dims", minimum=2)
        cv.require_number(config, "data.scattered.num_components", integer=True, minimum=1)
        cv.require_number(config, "data.scattered.radius", minimum=0, exclusive_minimum=True)
        low, high = (tuple(config.data.scattered.std_range) + (None, None))[:2]
        if not (isinstance(low, float | int) and isinstance(high, float | int) and 0 < low
                <= high):  # fmt: skip
            raise cv.ConfigError(
                f"config.data.scattered.std_range must be two numbers 0 < low "
                f"<= high, got {tuple(config.data.scattered.std_range)!r}"
            )
    cv.require_number(config, "compare.num_samples", integer=True, minimum=2)
    cv.require_number(config, "compare.reference_steps", integer=True, minimum=10)
    return schedule


def problem_dtype(config) -> Any:
    """float64 when ``compare.x64`` is set (the caller enables JAX's x64 mode), else float32."""
    return jax.numpy.float64 if config.compare.get("x64", False) else jax.numpy.float32


class GmmProblem(NamedTuple):
    """Everything the cells of one data dimension share."""

    mixture: GaussianMixture
    eps_fn: Any
    x_T: jax.Array
    noise_key: jax.Array
    data: np.ndarray
    reference: ReferenceSolve


SCATTERED = "scattered"  # problem names scattered<dim>: GaussianMixture.scattered


def mixture_for_problem(config, name: str) -> GaussianMixture:
    """The mixture of a fitting problem: ``dim<d>`` (:func:`mixture_for_dim`) or
    ``scattered<d>`` (``GaussianMixture.scattered`` with ``config.data.scattered``'s
    components, radius and std range: full-dimensional, outlier-prone)."""
    if name.startswith(SCATTERED):
        s = config.data.scattered
        return GaussianMixture.scattered(int(name[len(SCATTERED):]), s.num_components, s.radius,
                                         tuple(s.std_range), seed=config.seed)  # fmt: skip
    return mixture_for_dim(config, int(name[len("dim") :]))


def mixture_model_id(config, name: str) -> str:
    """The identity of a problem's mixture, as fitted files record it (``model_id``)."""
    return fingerprint({"mixture": config.data.to_dict(), "problem": name, "seed": config.seed})


def problem_names(config) -> list[str]:
    """``dim<d>`` for ``config.data.dims``, then ``scattered<d>`` for
    ``config.data.scattered.dims`` (when the config has that block)."""
    names = [f"dim{d}" for d in config.data.dims]
    if config.data.get("scattered") is not None:
        names += [f"{SCATTERED}{d}" for d in config.data.scattered.dims]
    return names


def mixture_for_dim(config, dim: int) -> GaussianMixture:
    """The 2-D ring for dim 2, an embedded low-dimensional mixture otherwise."""
    if dim == 2:
        return GaussianMixture.ring(config.data.num_components, std=config.data.ring_std)
    d = config.data
    return GaussianMixture.embedded(
        dim, d.num_components, d.latent_dim, d.radius, d.std, seed=config.seed
    )


def gmm_problem(config, dim: int, schedule: NoiseSchedule, dtype: Any) -> GmmProblem:
    """Mixture, x_T, exact data draws and the validated reference solve for ``dim``."""
    mixture = mixture_for_dim(config, dim)
    eps_fn = mixture.eps_fn(schedule)
    key_prior, key_data, key_noise = jax.random.split(jax.random.PRNGKey(config.seed + dim), 3)
    n = config.compare.num_samples
    x_T = schedule.prior_sample(key_prior, (n, dim), dtype)
    data = np.asarray(mixture.sample(key_data, n, dtype))
    t0, t1 = schedule.interval(config.sampler.t0, config.sampler.t1)
    ref = reference_solve(schedule, eps_fn, x_T, t0=t0, t1=t1, steps=config.compare.reference_steps)
    return GmmProblem(mixture, eps_fn, x_T, key_noise, data, ref)


def cached_problem(
    cache: dict, config, dim: int, schedule: NoiseSchedule, dtype: Any
) -> GmmProblem:
    """:func:`gmm_problem`, built once per distinct problem in ``cache`` (a dict the caller
    keeps, e.g. across the points of a sweep that share a reference)."""
    key = json.dumps(
        [config.sde.to_dict(), config.data.to_dict(), config.seed, dim,
         config.compare.num_samples, schedule.interval(config.sampler.t0, config.sampler.t1),
         config.compare.reference_steps, str(dtype)],
        sort_keys=True, default=str,
    )  # fmt: skip
    if key not in cache:
        cache[key] = gmm_problem(config, dim, schedule, dtype)
    return cache[key]


def cell_metrics(problem: GmmProblem, sampler: Sampler, out) -> dict:
    """``rmse`` against the reference (deterministic samplers, else None) and ``nll_gap``.

    When a sample is not finite (:func:`~deis_jax.sampling.diagnostics.nonfinite_samples`)
    the cell is a failure, not a result -- stochastic samplers included, whose ``rmse`` is
    None anyway: both metrics are None and ``failed`` says how many samples (e.g. ``"3 of 64
    samples non-finite (e.g. #0, #5, #17)"``)."""
    out = np.asarray(out, np.float64)
    bad = nonfinite_samples(out)
    if bad.size:
        reason = nonfinite_reason(bad, len(out))
        logging.warning("%s (NFE %d): %s", sampler.method, sampler.nfe, reason)
        return {"rmse": None, "nll_gap": None, FAILED: reason}
    return {
        "rmse": None if sampler.stochastic else rmse(out, problem.reference.x0),
        "nll_gap": nll_gap(problem.mixture.log_prob, out, problem.data),
    }


def run_cell(
    problem: GmmProblem, sampler: Sampler, mesh: jax.sharding.Mesh
) -> tuple[dict, np.ndarray]:
    """Sample ``problem.x_T`` with ``sampler``, sharded over ``mesh``; returns the record
    ``{"dim", "nfe", "rmse", "nll_gap", "seconds"}`` (seconds include compilation; plus
    ``failed`` when a sample is not finite, :func:`cell_metrics`) and the samples (float64)."""
    n, dim = problem.x_T.shape
    start = time.perf_counter()
    padded, _ = parallel.pad_batch(problem.x_T, mesh.size)
    out = sharded.shard_sampler(sampler, mesh)(
        parallel.shard_batch(padded, mesh), problem.noise_key, 0
    )
    out = parallel.gather(out)[:n].astype(np.float64)
    seconds = time.perf_counter() - start
    record = {"dim": int(dim), "nfe": int(sampler.nfe), **cell_metrics(problem, sampler, out)}
    return {**record, "seconds": seconds}, out


def evaluate_point(config, context: dict) -> list[dict]:
    """The sweep evaluator ``"gmm"``: one cell per ``data.dims`` with the sampler of
    ``config.sampler``, each record with the reference's ``reference_error``; samples sharded
    over ``context["mesh"]``, problems cached in ``context`` across points."""
    schedule = build.schedule_from_config(config.sde)
    cache = context.setdefault("problems", {})
    records = []
    for dim in config.data.dims:
        problem = cached_problem(cache, config, dim, schedule, problem_dtype(config))
        sampler = build.sampler_from_config(
            config.sampler, schedule, problem.eps_fn, model_id=mixture_model_id(config, f"dim{dim}")
        )
        record, _ = run_cell(problem, sampler, context["mesh"])
        seconds = record.pop("seconds")
        reference_error = float(problem.reference.error_estimate)
        records.append({**record, "reference_error": reference_error, "seconds": seconds})
    return records


# --- the comparison (--mode=compare): result rows and report --------------------------------

# ``failed``: the reason of a failed cell (non-finite samples), empty for a result
CSV_FIELDS = ("dim", "method", "nfe_budget", "nfe", "rmse", "nll_gap", "seconds", FAILED)


def reference_record(problem: GmmProblem) -> dict:
    """The reference row of a comparison: its NFE, its error estimate as ``rmse`` and the NLL
    gap of the reference samples (what an exact ODE solve reaches)."""
    ref = problem.reference
    return {
        "dim": int(problem.x_T.shape[1]), "method": "reference", "nfe_budget": ref.nfe,
        "nfe": ref.nfe, "rmse": ref.error_estimate,
        "nll_gap": nll_gap(problem.mixture.log_prob, ref.x0, problem.data), "seconds": None,
    }  # fmt: skip


def check_references(records: Sequence[dict]) -> None:
    """Warn for each dim whose reference error estimate is not 100x below the smallest error
    measured against it."""
    for ref in (r for r in records if r["method"] == "reference"):
        dim = ref["dim"]
        errors = [r["rmse"] for r in records if r["dim"] == dim and r is not ref and r["rmse"]]
        if errors and ref["rmse"] > 0.01 * min(errors):
            logging.warning(
                "dim %d: reference error estimate %.2e is not 100x below the smallest measured "
                "error %.2e; raise compare.reference_steps", dim, ref["rmse"], min(errors),
            )  # fmt: skip


def write_report(
    workdir: str,
    records: Sequence[dict],
    labels: Sequence[str],
    nfes: Sequence[int],
    scatters: Sequence[tuple[str, Any]],
) -> None:
    """``results.csv`` (:data:`CSV_FIELDS`), ``results.md`` (per dim: RMSE and NLL-gap tables,
    method x NFE budget, a failed cell reading "failed", a metric a method has not "—", and
    the reference line), ``error_vs_nfe.png`` and, given ``scatters`` (``(title, samples)``
    panels), ``samples_2d.png``; also prints the tables."""
    dims = list(dict.fromkeys(r["dim"] for r in records))
    write_csv(os.path.join(workdir, "results.csv"), records, CSV_FIELDS)
    sections = ["# Sampler comparison on Gaussian mixtures (exact score)\n"]
    panels = []

    def with_nfe(r, key):
        if r.get(FAILED):
            return FAILED
        text = "—" if r[key] is None else f"{r[key]:.2e}"
        extra = r["nfe"] - r["nfe_budget"]
        return f"{text}⁺{extra}" if extra > 0 else text

    for dim in dims:
        recs = [r for r in records if r["dim"] == dim]
        ref = next(r for r in recs if r["method"] == "reference")
        for metric, title in (("rmse", "RMSE vs reference"), ("nll_gap", "NLL gap (nats/dim)")):
            rows, cols, cells = pivot(
                recs, "method", "nfe_budget", lambda r, m=metric: with_nfe(r, m), labels, nfes
            )
            header = ["method \\ NFE"] + [str(c) for c in cols]
            body = [[a] + c for a, c in zip(rows, cells, strict=True)]
            sections.append(f"## dim {dim}: {title}\n\n" + markdown_table(header, body))
        sections.append(
            f"Reference: RK4 in rho, {ref['nfe']} NFE, error estimate (step doubling) "
            f"{ref['rmse']:.2e}; NLL gap of the reference samples {ref['nll_gap']:.3e}. "
            f"⁺k: the method spent k more NFE than the budget "
            f"(Runge-Kutta rounds up to whole steps). {FAILED}: the cell's samples were not "
            f"finite (results.csv says how many).\n"
        )
        curves = {}
        for label in labels:
            pts = [(r["nfe"], r["rmse"]) for n in nfes for r in recs
                   if r["method"] == label and r["nfe_budget"] == n]  # fmt: skip
            if any(v is not None for _, v in pts):
                curves[label] = ([p[0] for p in pts], [p[1] for p in pts])
        panels.append((f"dim {dim}", curves))
    atomic_write_text(os.path.join(workdir, "results.md"), "\n".join(sections))
    plot_metric_vs_nfe(
        panels, os.path.join(workdir, "error_vs_nfe.png"), "RMSE vs reference", xticks=nfes
    )
    if scatters:
        plot_scatter_grid(scatters, os.path.join(workdir, "samples_2d.png"))
    print("\n".join(sections))
    logging.info("wrote results to %s", workdir)
