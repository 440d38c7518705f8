"""``--mode=compare``: every method x every NFE on a Gaussian mixture with an exact score.

For each data dimension in ``config.data.dims`` the same ``x_T`` (``compare.num_samples``
draws from the prior) is integrated by every method in ``compare.methods`` at every NFE in
``compare.nfes`` and by a reference solver (RK4 in rho on a log-SNR grid, validated by step
doubling); the problem and the cell are :mod:`deis_jax.experiments.gmm`. Each cell records

* ``rmse``  -- RMS over samples and dimensions of (sample - reference), the discretisation
  error of the probability-flow ODE solve (deterministic methods only);
* ``nll_gap`` -- excess negative log-likelihood per dimension of the samples under the true
  data density, relative to exact data draws (any method, stochastic ones included; the
  reference row shows what an exact ODE solve from ``t1`` to ``t0`` reaches).

The reference row of each dimension is a cell too. Cells run on the experiment engine
(:mod:`deis_jax.experiments.engine`, lines sealed and checked on resume by
:mod:`deis_jax.experiments.engine`): each finished cell is appended to ``results.jsonl``
(a killed run resumes where it stopped; a damaged line is named and its cell computed again;
a cell with non-finite samples is reported as failed, without metrics, and computed again by
the next run); ``results.csv``, ``results.md``, ``error_vs_nfe.png`` and
``samples_2d.png`` are rewritten atomically at the end. The scatter plot shows the dim-2
samples at ``compare.scatter_nfe``: those computed in this run are kept, those of cached cells
are recomputed (2-D, deterministic, a fraction of a second each).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax

from deis_jax.common import checks as cv
from deis_jax.common import parallel
from deis_jax.common.identity import fingerprint
from deis_jax.experiments import build, gmm, validation
from deis_jax.experiments.engine import Cell, Progress, run_cells
from deis_jax.sampling.method_spec import MethodChoice, parse_method_spec
from deis_jax.sampling.sde import NoiseSchedule


class Plan(NamedTuple):
    """What :func:`validate` built: the schedule, the parsed methods, the cells."""

    schedule: NoiseSchedule
    choices: list[MethodChoice]
    cells: list[Cell]
    fingerprint: str


def validate(config) -> Plan:
    """Check every field (before any work) and lay out the cells."""
    schedule = gmm.validate_problem(config)
    methods = cv.get_field(config, "compare.methods")
    if isinstance(methods, str) or not methods:
        raise cv.ConfigError(f"config.compare.methods must be a non-empty list, got {methods!r}")
    choices = []
    for text in methods:
        try:
            choices.append(parse_method_spec(text))
        except ValueError as err:
            raise cv.ConfigError(f"config.compare.methods: {err}") from None
    nfes = validation.require_nfe_list(config, "compare.nfes", choices)
    cv.require_number(config, "compare.scatter_nfe", integer=True, minimum=1)
    cells = []
    for dim in config.data.dims:
        cells.append(Cell(f"{dim}|reference", label=f"dim={dim} reference", payload=(dim, None, 0)))
        cells += [
            Cell(f"{dim}|{c.label}|{n}", label=f"dim={dim} {c.label} nfe={n}", payload=(dim, c, n))
            for c in choices for n in nfes
        ]  # fmt: skip
    if len({c.key for c in cells}) != len(cells):
        raise cv.ConfigError("config.compare.methods and config.data.dims must not repeat")
    identity = {k: config[k].to_dict() for k in ("sde", "data")}
    keys = ("grid", "grid_power", "t0", "t1", "final_denoise", "options")
    identity["sampler"] = {k: config.sampler.get(k) for k in keys}
    identity["samples"] = [config.compare.num_samples, config.compare.reference_steps]
    identity["seed"], identity["x64"] = config.seed, bool(config.compare.get("x64", False))
    return Plan(schedule, choices, cells, fingerprint(identity))


def _cell(config, plan: Plan, problem, choice, nfe, mesh) -> tuple[dict, tuple]:
    """One method cell: its result row and its scatter panel ``(title, samples)``. When a
    sample is not finite the row is a failure (``gmm.cell_metrics``): ``failed`` says how
    many, the metrics are None."""
    sampler = build.sampler_from_config(
        config.sampler, plan.schedule, problem.eps_fn, method=choice.method,
        order=choice.order, nfe=nfe, options=choice.options,
    )  # fmt: skip
    record, out = gmm.run_cell(problem, sampler, mesh)
    panel = (f"{choice.label} (NFE {sampler.nfe})", out)
    return {"method": choice.label, "nfe_budget": nfe, **record}, panel


def check_inputs(config, workdir: str, plan: Plan) -> None:
    """The files this mode reads: none (the problem is analytic)."""


def run(config, workdir: str, plan: Plan | None = None) -> list[dict]:
    """Run (or resume) the comparison and write the report; returns the result rows."""
    plan = validate(config) if plan is None else plan
    if config.compare.x64:
        jax.config.update("jax_enable_x64", True)
    dims, nfes = list(config.data.dims), list(config.compare.nfes)
    scatter_nfe = config.compare.scatter_nfe if 2 in dims else None
    mesh, problems, panels = parallel.make_mesh(), {}, {}

    def problem(dim):
        return gmm.cached_problem(problems, config, dim, plan.schedule, gmm.problem_dtype(config))

    def compute(cell: Cell, advance: Progress) -> dict:
        dim, choice, nfe = cell.payload
        if choice is None:
            return gmm.reference_record(problem(dim))
        record, panel = _cell(config, plan, problem(dim), choice, nfe, mesh)
        if (dim, nfe) == (2, scatter_nfe):
            panels[choice.label] = panel
        return record

    os.makedirs(workdir, exist_ok=True)
    records = list(
        run_cells(
            plan.cells, compute, cache_path=os.path.join(workdir, "results.jsonl"),
            fingerprint=plan.fingerprint, desc="compare",
        ).values()
    )  # fmt: skip
    scatters = []  # on every process: recomputing a panel may use collectives over the mesh
    if scatter_nfe is not None:
        ref = problem(2).reference
        scatters = [("data (exact)", problem(2).data), (f"reference ({ref.nfe} NFE)", ref.x0)]
        for choice in plan.choices if scatter_nfe in nfes else ():
            if choice.label not in panels:  # a cached cell: recompute its 2-D samples
                panels[choice.label] = _cell(config, plan, problem(2), choice, scatter_nfe, mesh)[1]
            scatters.append(panels[choice.label])
    if jax.process_index() != 0:
        return []
    gmm.check_references(records)
    gmm.write_report(workdir, records, [c.label for c in plan.choices], nfes, scatters)
    return records
