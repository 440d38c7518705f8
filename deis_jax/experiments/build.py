"""Build schedules and samplers from the ``config.sde`` / ``config.sampler`` blocks.

``config.sde``:     name (vpsde | subvpsde | vesde | discrete_vpsde | edm), beta_min,
                    beta_max, schedule (linear | cosine, VP only), num_scales, sigma_min,
                    sigma_max (VE and EDM), beta_start, beta_end, num_steps (discrete).
``config.sampler``: method, order, nfe, grid, grid_power, t0, t1, final_denoise, options,
                    grid_file (with ``grid="optimized"``: a fitted grid file, see
                    ``deis_jax.fitting.grid_file``), predictor_file (AMED methods: a
                    trained predictor file, ``deis_jax.fitting.amed.AmedPredictorFile``,
                    which carries its own grid).
"""

from __future__ import annotations

import os
from typing import Any

from deis_jax.fitting.amed import AmedPredictorFile
from deis_jax.fitting.grid_file import OPTIMIZED_GRID, OptimizedGrid
from deis_jax.fitting.recipes import FittedSampler
from deis_jax.sampling import solvers
from deis_jax.sampling.sampler import Sampler, get_sampler
from deis_jax.sampling.sde import NoiseSchedule, get_sde
from deis_jax.sampling.wrappers import EpsFn

SDE_FIELDS = {
    "vpsde": ("beta_min", "beta_max", "schedule", "num_scales"),
    "subvpsde": ("beta_min", "beta_max", "num_scales"),
    "vesde": ("sigma_min", "sigma_max"),
    "edm": ("sigma_min", "sigma_max"),
    "discrete_vpsde": ("beta_start", "beta_end", "num_steps"),
}


def _get(cfg, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def schedule_from_config(sde_cfg) -> NoiseSchedule:
    """The noise schedule described by a ``config.sde`` block (only its name's fields)."""
    name = _get(sde_cfg, "name")
    fields = SDE_FIELDS.get(name, ())
    kwargs = {k: _get(sde_cfg, k) for k in fields if _get(sde_cfg, k) is not None}
    return get_sde(name, **kwargs)


def sampler_from_config(
    sampler_cfg,
    schedule: NoiseSchedule,
    eps_fn: EpsFn,
    *,
    model_id: str | None = None,
    **overrides: Any,
) -> Sampler:
    """``get_sampler`` with the config's fields; ``overrides`` replace individual fields.

    ``grid="optimized"`` reads ``grid_file`` (an :class:`OptimizedGrid`) and refuses it with
    a ``ValueError`` naming every setting it was not fitted for; ``predictor_file`` likewise
    reads a trained AMED predictor (its grid and parameters) for an AMED method;
    ``fitted_file`` reads a :class:`FittedSampler` (``deis_jax.fit_sampler``), which brings its
    own method, grid, table or predictor, refused for another schedule, NFE or interval (and,
    given ``model_id``, another model)."""
    fields = {
        k: _get(sampler_cfg, k)
        for k in ("method", "order", "nfe", "grid", "grid_power", "t0", "t1", "final_denoise")
    }
    fields["nfe_rounding"] = _get(sampler_cfg, "nfe_rounding") or "exact"
    fields.update(overrides)
    options = dict(_get(sampler_cfg, "options") or {})
    options.update(fields.pop("options", None) or {})
    fields["final_denoise"] = bool(fields["final_denoise"])
    fitted_path = fields.pop("fitted_file", _get(sampler_cfg, "fitted_file"))
    if fitted_path:
        return _fitted_sampler_file(fitted_path, fields, schedule, eps_fn, model_id)
    # an explicit predictor_file override (None included) wins over the config's
    predictor_path = fields.pop("predictor_file", _get(sampler_cfg, "predictor_file"))
    if predictor_path:
        return _learned_predictor_sampler(predictor_path, fields, options, schedule, eps_fn)
    if fields["grid"] != OPTIMIZED_GRID:
        return get_sampler(schedule, eps_fn, **fields, **options)
    path = fields.pop("grid_file", None) or _get(sampler_cfg, "grid_file")
    if not path:
        raise ValueError("grid='optimized' needs grid_file (a file written by --mode=fit)")
    if fields["final_denoise"]:
        raise ValueError("grid='optimized' does not take final_denoise (fit the grid with it)")
    return _fitted_sampler(OptimizedGrid.load(path), fields, options, schedule, eps_fn)


def _fitted_sampler(fitted, fields, options, schedule, eps_fn, rule_params=None) -> Sampler:
    """The sampler of a fitted file (``OptimizedGrid`` or ``AmedPredictorFile``), refused with
    a ``ValueError`` naming every setting unless the config asks for what it was fitted for."""
    spec = solvers.get_method(fields["method"])
    order = spec.check(fields["order"], options)
    nfe = fields["nfe"]
    if fields.get("parallel_nfe") is not None:  # the evaluations of a parallel_nfe budget
        own = {k: v for k, v in options.items() if k != "afs"}
        afs, final = bool(options.get("afs", False)), fields["final_denoise"]
        steps = spec.num_steps(fields["parallel_nfe"], order, own, afs=afs, final_denoise=final,
                               rounding=fields["nfe_rounding"], parallel=True)  # fmt: skip
        per_step, offset = spec.budget(order, own, afs=afs, final_denoise=final)
        nfe = per_step * steps + offset
    fitted.check_compatible(schedule, method=fields["method"], order=order, nfe=nfe,
                            options=options, t0=fields["t0"], t1=fields["t1"])  # fmt: skip
    return Sampler(fitted.plan(schedule), eps_fn, rule_params=rule_params)


def _fitted_sampler_file(path, fields, schedule, eps_fn, model_id) -> Sampler:
    """The sampler of a ``FittedSampler`` file, checked against the config's NFE and
    interval (and the model, given its id)."""
    if fields["final_denoise"]:
        raise ValueError("fitted_file does not take final_denoise")
    t0, t1 = schedule.interval(fields["t0"], fields["t1"])
    fitted = FittedSampler.load(path, schedule, nfe=fields["nfe"], t0=t0, t1=t1,
                                model_id=model_id)  # fmt: skip
    return Sampler(fitted.plan(), eps_fn, rule_params=fitted.rule_params())


def _learned_predictor_sampler(path, fields, options, schedule, eps_fn) -> Sampler:
    """The sampler of an AMED predictor file (its grid and parameters)."""
    if fields["grid"] == OPTIMIZED_GRID:
        raise ValueError("predictor_file carries its own grid: do not combine it with "
                         "grid='optimized'")  # fmt: skip
    if fields["final_denoise"]:
        raise ValueError("predictor_file does not take final_denoise")
    learned = AmedPredictorFile.load(path)
    return _fitted_sampler(learned, fields, options, schedule, eps_fn, learned.rule_params())


def grid_path(workdir: str, problem: str, label: str, nfe: int, variant: str) -> str:
    """Where a fitted cell's file goes (``label``: the method label)."""
    name = f"{label.replace(':', '_').replace(',', '_').replace('=', '-')}"
    variant = variant.replace(":", "_")
    return os.path.join(workdir, "grids", problem, f"{name}_nfe{nfe}_{variant}.json")
