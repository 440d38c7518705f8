"""Start-up validation of the ``config.sde`` and ``config.sampler`` blocks.

Every mode (``deis_jax.experiments.<mode>``) checks its config with these and the generic
checks of ``deis_jax.common.checks``; a bad value raises ``ConfigError`` naming the field
(dotted path) and the allowed values. Sampler arguments are checked by the method's own spec
(``MethodSpec.check``: integer order, NFE in ``[1, MAX_NFE]``, options), grids by
``deis_jax.sampling.timesteps`` and the interval by ``NoiseSchedule.interval`` (inside the
schedule's valid domain, e.g. ``t1 <= 0.998`` for the cosine VP schedule): this module only
says which config field was at fault. Every check is O(1) in the NFE but the final dry run,
which builds the plan once (at most ``MAX_NFE`` steps, well under a second).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from deis_jax.common.checks import (
    ConfigError,
    get_field,
    require_bool,
    require_choice,
    require_int_list,
    require_number,
)
from deis_jax.experiments.build import sampler_from_config, schedule_from_config
from deis_jax.fitting.grid_file import OPTIMIZED_GRID
from deis_jax.sampling import solvers
from deis_jax.sampling.method_spec import MethodChoice
from deis_jax.sampling.sde import SDE_NAMES, VP_BETA_SCHEDULES, NoiseSchedule
from deis_jax.sampling.solvers.registry import NFE_ROUNDINGS
from deis_jax.sampling.timesteps import GRID_KINDS, check_grid_power


def nfe_rounding(config, path: str = "sampler") -> str:
    """``config.<path>.nfe_rounding`` (``solvers.NFE_ROUNDINGS``; ``"exact"`` when absent):
    whether a budget a method cannot spend exactly is refused or rounded up."""
    if get_field(config, path).get("nfe_rounding") is None:
        return "exact"
    return require_choice(config, f"{path}.nfe_rounding", NFE_ROUNDINGS)


def check_budget(
    config, path: str, nfe: Any, choice: MethodChoice, rounding: str, parallel: bool = False
) -> None:
    """``nfe`` (from ``config.<path>``) is a budget ``choice`` accepts: an integer in
    ``[1, MAX_NFE]`` that it spends exactly (``MethodSpec.num_steps``) unless ``rounding`` is
    ``"up"``; ``parallel``: counted in sequential rounds (``parallel_nfe``). ``ConfigError``
    naming the field, the budget and the method. O(1)."""
    spec = solvers.get_method(choice.method)
    options = dict(choice.options)
    afs = bool(options.pop("afs", False))
    try:
        spec.check_nfe(nfe, choice.order)
        spec.num_steps(nfe, choice.order, options, afs=afs, rounding=rounding, parallel=parallel)
    except solvers.MethodArgumentError as err:
        raise ConfigError(f"config.{path} entry {nfe!r}: {err.problem}") from None


def require_nfe_list(
    config,
    path: str,
    methods: Iterable[MethodChoice],
    rounding: str | None = None,
    parallel: bool = False,
) -> list[int]:
    """``config.<path>`` as a non-empty list of NFE budgets, each checked for every method of
    ``methods`` by the method's own rule (:func:`check_budget`: an integer in ``[1, MAX_NFE]``
    that the method spends exactly, unless ``rounding`` -- default
    ``config.sampler.nfe_rounding`` -- is ``"up"``), so that a budget no cell could run fails
    at start-up, naming the field, the budget and the method. O(1) per budget: nothing is
    built."""
    values = require_int_list(config, path, minimum=1)
    rounding = nfe_rounding(config) if rounding is None else rounding
    for choice in methods:
        for nfe in values:
            check_budget(config, path, nfe, choice, rounding, parallel)
    return values


def validate_sde(config) -> NoiseSchedule:
    """Check ``config.sde`` and return the schedule it describes."""
    name = require_choice(config, "sde.name", SDE_NAMES)
    if name == "vpsde" and config.sde.get("schedule") is not None:
        require_choice(config, "sde.schedule", VP_BETA_SCHEDULES)
    for field in ("beta_min", "beta_max", "sigma_min", "sigma_max", "beta_start", "beta_end"):
        if config.sde.get(field) is not None:
            require_number(config, f"sde.{field}", minimum=0, exclusive_minimum=True)
    for field in ("num_scales", "num_steps"):
        if config.sde.get(field) is not None:
            require_number(config, f"sde.{field}", integer=True, minimum=2)
    sigmas = (config.sde.get("sigma_min"), config.sde.get("sigma_max"))
    if name in ("vesde", "edm") and None not in sigmas and not sigmas[0] < sigmas[1]:
        raise ConfigError(
            f"config.sde.sigma_min must be < config.sde.sigma_max, got {sigmas[0]!r} and "
            f"{sigmas[1]!r}"
        )
    try:
        return schedule_from_config(config.sde)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config.sde is invalid: {err}") from None


def validate_sampler(config, schedule: NoiseSchedule | None = None, path: str = "sampler"):
    """Check ``config.<path>`` with the method's spec, the grid and the interval; build the
    sampler (with an identity ``eps_fn``) as a dry run and return it."""
    schedule = validate_sde(config) if schedule is None else schedule
    method = require_choice(config, f"{path}.method", solvers.method_names())
    spec = solvers.get_method(method)
    section = get_field(config, path)
    options = dict(section.get("options") or {})
    final_denoise = False
    if section.get("final_denoise") is not None:
        final_denoise = require_bool(config, f"{path}.final_denoise")
    rounding = nfe_rounding(config, path)
    try:
        order = spec.check(get_field(config, f"{path}.order"), options,
                           final_denoise=final_denoise)  # fmt: skip
        nfe = spec.check_nfe(get_field(config, f"{path}.nfe"), order)
        own = {k: v for k, v in options.items() if k != "afs"}
        spec.num_steps(nfe, order, own, afs=bool(options.get("afs", False)),
                       final_denoise=final_denoise, rounding=rounding)  # fmt: skip
    except solvers.MethodArgumentError as err:
        raise ConfigError(f"config.{path}.{err.field} {err.problem}") from None
    grid = section.get("grid")
    if grid is not None:
        require_choice(config, f"{path}.grid", GRID_KINDS + (OPTIMIZED_GRID,))
    for field in ("grid_power", "t0", "t1"):
        if section.get(field) is not None:
            require_number(config, f"{path}.{field}")
    try:
        if grid != OPTIMIZED_GRID:
            check_grid_power(spec.default_grid if grid is None else grid, section.get("grid_power"))
        schedule.interval(section.get("t0"), section.get("t1"))
    except ValueError as err:  # their messages start with the field: grid_power, t0 or t1
        raise ConfigError(f"config.{path}.{err}") from None
    predictor_file = section.get("predictor_file")
    if predictor_file is not None and (
        not isinstance(predictor_file, str) or not os.path.isfile(predictor_file)
    ):
        raise ConfigError(
            f"config.{path}.predictor_file must name an existing AMED predictor file (written "
            f"by --mode=fit with the 'amed' variant), got {predictor_file!r}"
        )
    fitted_file = section.get("fitted_file")
    if fitted_file is not None:
        if not isinstance(fitted_file, str) or not os.path.isfile(fitted_file):
            raise ConfigError(
                f"config.{path}.fitted_file must name an existing fitted sampler file (written "
                f"by deis_jax.fit_sampler or --mode=fit's recipe cells), got {fitted_file!r}"
            )
        if predictor_file is not None or grid == OPTIMIZED_GRID:
            raise ConfigError(
                f"config.{path}.fitted_file brings its own method, grid and table or predictor: "
                f"do not combine it with predictor_file or grid='optimized'"
            )
    if grid == OPTIMIZED_GRID:
        grid_file = section.get("grid_file")
        if not isinstance(grid_file, str) or not os.path.isfile(grid_file):
            raise ConfigError(
                f"config.{path}.grid_file must name an existing grid file (written by "
                f"--mode=fit) when config.{path}.grid='optimized', got {grid_file!r}"
            )
    try:
        return sampler_from_config(section, schedule, lambda x, t: x)
    except ValueError as err:
        where = f"{path}.grid_file" if grid == OPTIMIZED_GRID else path
        where = f"{path}.predictor_file" if predictor_file else where
        where = f"{path}.fitted_file" if fitted_file else where
        raise ConfigError(f"config.{where} is invalid: {err}") from None
