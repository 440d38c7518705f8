"""``--mode=compare``: every method x every NFE on a Gaussian mixture with an exact score.

For each data dimension in ``config.data.dims`` the same ``x_T`` (``compare.num_samples``
draws from the prior) is integrated by every method in ``compare.methods`` at every NFE in
``compare.nfes`` and by a reference solver (RK4 in rho on a log-SNR grid, validated by step
doubling, see ``deis_jax.evaluation.reference``). Each cell records

* ``rmse``  -- RMS over samples and dimensions of (sample - reference), the discretisation
  error of the probability-flow ODE solve (deterministic methods only);
* ``nll_gap`` -- excess negative log-likelihood per dimension of the samples under the true
  data density, relative to exact data draws (any method, stochastic ones included; the
  reference row shows what an exact ODE solve from ``t1`` to ``t0`` reaches).

Each finished cell is appended to ``results.jsonl`` (a killed run resumes where it stopped);
``results.csv``, ``results.md``, ``error_vs_nfe.png`` and ``samples_2d.png`` are rewritten
atomically at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import NamedTuple

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from deis_jax import build
from deis_jax import config_validation as cv
from deis_jax.evaluation.analytic import GaussianMixture
from deis_jax.evaluation.metrics import nll_gap, rmse
from deis_jax.evaluation.reference import reference_solve
from deis_jax.io_utils import append_jsonl, atomic_write_text, read_jsonl
from deis_jax.reporting import (
    markdown_table,
    pivot,
    plot_metric_vs_nfe,
    plot_scatter_grid,
    write_csv,
)
from deis_jax.sampling.method_spec import MethodChoice, parse_method_spec

CSV_FIELDS = ("dim", "method", "nfe_budget", "nfe", "rmse", "nll_gap", "seconds")


def validate_problem(config) -> None:
    """The fields ``gmm_problem`` reads (shared with ``--mode=sweep``)."""
    schedule = cv.validate_sde(config)
    cv.validate_sampler(config, schedule)
    cv.require_choice(config, "data.name", ("gmm",))
    cv.require_int_list(config, "data.dims", minimum=1)
    cv.require_number(config, "data.num_components", integer=True, minimum=1)
    cv.require_number(config, "data.latent_dim", integer=True, minimum=1)
    for field in ("data.radius", "data.std", "data.ring_std"):
        cv.require_number(config, field, minimum=0, exclusive_minimum=True)
    cv.require_number(config, "compare.num_samples", integer=True, minimum=2)
    cv.require_number(config, "compare.reference_steps", integer=True, minimum=10)


def validate(config) -> list[MethodChoice]:
    validate_problem(config)
    cv.require_int_list(config, "compare.nfes", minimum=1)
    cv.require_number(config, "compare.scatter_nfe", integer=True, minimum=1)
    methods = cv.get_field(config, "compare.methods")
    if isinstance(methods, str) or not methods:
        raise cv.ConfigError(f"config.compare.methods must be a non-empty list, got {methods!r}")
    choices = []
    for text in methods:
        try:
            choices.append(parse_method_spec(text))
        except ValueError as err:
            raise cv.ConfigError(f"config.compare.methods: {err}") from None
    return choices


class GmmProblem(NamedTuple):
    """Everything one data dimension of the embedded job needs, built the same way by
    ``--mode=compare`` and ``--mode=sweep`` (same keys, so the same x_T and reference)."""

    mixture: GaussianMixture
    eps_fn: object
    x_T: jax.Array
    noise_key: jax.Array
    data: np.ndarray
    reference: object  # deis_jax.evaluation.reference.Reference


def mixture_for_dim(config, dim: int) -> GaussianMixture:
    """The 2-D ring for dim 2, an embedded low-dimensional mixture otherwise."""
    if dim == 2:
        return GaussianMixture.ring(config.data.num_components, std=config.data.ring_std)
    d = config.data
    return GaussianMixture.embedded(
        dim, d.num_components, d.latent_dim, d.radius, d.std, seed=config.seed
    )


def sampling_interval(config, schedule) -> tuple[float, float]:
    t0 = config.sampler.t0 if config.sampler.t0 is not None else schedule.default_t0
    t1 = config.sampler.t1 if config.sampler.t1 is not None else schedule.default_t1
    return float(t0), float(t1)


def gmm_problem(config, dim: int, schedule, dtype) -> GmmProblem:
    """Mixture, x_T, exact data draws and the validated reference solve for ``dim``."""
    mixture = mixture_for_dim(config, dim)
    eps_fn = mixture.eps_fn(schedule)
    key_prior, key_data, key_noise = jax.random.split(jax.random.PRNGKey(config.seed + dim), 3)
    n = config.compare.num_samples
    x_T = schedule.prior_sample(key_prior, (n, dim), dtype)
    data = np.asarray(mixture.sample(key_data, n, dtype))
    t0, t1 = sampling_interval(config, schedule)
    ref = reference_solve(schedule, eps_fn, x_T, t0=t0, t1=t1, steps=config.compare.reference_steps)
    return GmmProblem(mixture, eps_fn, x_T, key_noise, data, ref)


def cell_metrics(problem: GmmProblem, sampler, out) -> dict:
    """``rmse`` against the reference (deterministic samplers) and the NLL gap."""
    out = np.asarray(out, np.float64)
    finite = bool(np.all(np.isfinite(out)))
    if not finite:
        logging.warning("%s produced non-finite samples", sampler.method)
    return {
        "rmse": None if sampler.stochastic else rmse(out, problem.reference.x0),
        "nll_gap": nll_gap(problem.mixture.log_prob, out, problem.data) if finite else None,
    }


def _fingerprint(config) -> str:
    keys = {k: config[k].to_dict() for k in ("sde", "data")}
    keys["sampler"] = {
        k: config.sampler.get(k) for k in ("grid", "grid_power", "t0", "t1", "final_denoise")
    }
    keys["samples"] = [config.compare.num_samples, config.compare.reference_steps, config.seed]
    return hashlib.sha1(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run(config, workdir: str) -> None:
    choices = validate(config)
    if config.compare.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jax.numpy.float64 if config.compare.x64 else jax.numpy.float32
    schedule = cv.validate_sde(config)
    os.makedirs(workdir, exist_ok=True)
    cache_path = os.path.join(workdir, "results.jsonl")
    fingerprint = _fingerprint(config)
    done = {r["key"]: r for r in read_jsonl(cache_path) if r.get("fingerprint") == fingerprint}

    dims = list(config.data.dims)
    nfes = list(config.compare.nfes)
    total = len(dims) * (len(choices) * len(nfes) + 1)
    records, scatters = [], []
    bar = tqdm(total=total, desc="compare", unit="cell", dynamic_ncols=True)
    for dim in dims:
        bar.set_postfix_str(f"dim={dim} reference")
        problem = gmm_problem(config, dim, schedule, dtype)
        ref, data, x_T = problem.reference, problem.data, problem.x_T
        ref_row = {
            "dim": dim, "method": "reference", "nfe_budget": ref.nfe, "nfe": ref.nfe,
            "rmse": ref.error_estimate,
            "nll_gap": nll_gap(problem.mixture.log_prob, ref.x0, data),
            "seconds": None,
        }  # fmt: skip
        records.append(ref_row)
        bar.update(1)
        if dim == 2:
            scatters += [("data (exact)", data), (f"reference ({ref.nfe} NFE)", ref.x0)]
        for choice in choices:
            for nfe in nfes:
                cell_key = f"{dim}|{choice.label}|{nfe}"
                bar.set_postfix_str(f"dim={dim} {choice.label} nfe={nfe}")
                if cell_key in done and not (dim == 2 and nfe == config.compare.scatter_nfe):
                    records.append(done[cell_key]["record"])
                    bar.update(1)
                    continue
                sampler = build.sampler_from_config(
                    config.sampler, schedule, problem.eps_fn, method=choice.method,
                    order=choice.order, nfe=nfe, options=choice.options,
                )  # fmt: skip
                start = time.perf_counter()
                out = (
                    jax.jit(sampler)(x_T, problem.noise_key)
                    if sampler.stochastic
                    else jax.jit(sampler)(x_T)
                )
                out = np.asarray(jax.block_until_ready(out), np.float64)
                record = {
                    "dim": dim, "method": choice.label, "nfe_budget": nfe, "nfe": sampler.nfe,
                    **cell_metrics(problem, sampler, out),
                    "seconds": time.perf_counter() - start,
                }  # fmt: skip
                if cell_key not in done:
                    append_jsonl(cache_path, {"key": cell_key, "fingerprint": fingerprint,
                                              "record": record})  # fmt: skip
                records.append(record)
                if dim == 2 and nfe == config.compare.scatter_nfe:
                    scatters.append((f"{choice.label} (NFE {sampler.nfe})", out))
                bar.update(1)
        deterministic_errors = [
            r["rmse"] for r in records
            if r["dim"] == dim and r["method"] != "reference" and r["rmse"]
        ]  # fmt: skip
        if deterministic_errors and ref.error_estimate > 0.01 * min(deterministic_errors):
            logging.warning(
                "dim %d: reference error estimate %.2e is not 100x below the smallest measured "
                "error %.2e; raise compare.reference_steps", dim, ref.error_estimate,
                min(deterministic_errors),
            )  # fmt: skip
    bar.close()
    _write_outputs(workdir, records, choices, nfes, dims, scatters)


def _write_outputs(workdir, records, choices, nfes, dims, scatters) -> None:
    write_csv(os.path.join(workdir, "results.csv"), records, CSV_FIELDS)
    labels = [c.label for c in choices]
    sections = ["# Sampler comparison on Gaussian mixtures (exact score)\n"]
    panels = []
    for dim in dims:
        recs = [r for r in records if r["dim"] == dim]
        ref = next(r for r in recs if r["method"] == "reference")
        spent = {(r["method"], r["nfe_budget"]): r["nfe"] for r in recs}

        def with_nfe(r, key):
            value = r[key]
            extra = r["nfe"] - r["nfe_budget"]
            text = "—" if value is None else f"{value:.2e}"
            return f"{text}⁺{extra}" if extra > 0 else text

        for metric, title in (("rmse", "RMSE vs reference"), ("nll_gap", "NLL gap (nats/dim)")):
            rows, cols, cells = pivot(
                recs, "method", "nfe_budget", lambda r, m=metric: with_nfe(r, m), labels, nfes
            )
            sections.append(
                f"## dim {dim}: {title}\n\n"
                + markdown_table(
                    ["method \\ NFE"] + [str(c) for c in cols],
                    [[a] + c for a, c in zip(rows, cells, strict=True)],
                )  # fmt: skip
            )
        sections.append(
            f"Reference: RK4 in rho, {ref['nfe']} NFE, error estimate (step doubling) "
            f"{ref['rmse']:.2e}; NLL gap of the reference samples {ref['nll_gap']:.3e}. "
            f"⁺k: the method spent k more NFE than the budget "
            f"(Runge-Kutta rounds up to whole steps).\n"
        )
        curves = {}
        for label in labels:
            pts = [(spent[(label, n)], r["rmse"]) for n in nfes for r in recs
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
