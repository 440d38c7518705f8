"""Start-up validation of ``ml_collections`` configs.

Every mode module (``deis_jax.modes.<mode>``, looked up with ``deis_jax.modes.get_mode``)
exposes ``validate(config)`` built from the checks here. A bad value raises ``ConfigError``
naming the field (dotted path) and the allowed values. Sampler arguments are checked by the
method's own spec (``MethodSpec.check``: integer order, NFE in ``[1, MAX_NFE]``, options),
grids by ``deis_jax.sampling.timesteps`` and the interval by ``NoiseSchedule.interval``
(inside the schedule's valid domain, e.g. ``t1 <= 0.998`` for the cosine VP schedule): this
module only says which config field was at fault. Every check is O(1) in the NFE but the
final dry run, which builds the plan once (at most ``MAX_NFE`` steps, well under a second).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from deis_jax.build import sampler_from_config, schedule_from_config
from deis_jax.fitting.grid_file import OPTIMIZED_GRID
from deis_jax.sampling import solvers
from deis_jax.sampling.method_spec import MethodChoice
from deis_jax.sampling.sde import SDE_NAMES, VP_BETA_SCHEDULES, NoiseSchedule
from deis_jax.sampling.solvers.registry import NFE_ROUNDINGS
from deis_jax.sampling.timesteps import GRID_KINDS, check_grid_power


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field and what is allowed."""


def get_field(config, path: str) -> Any:
    """``config`` value at dotted ``path``; a missing field is a ``ConfigError``."""
    node = config
    for part in path.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(f"config.{path} is missing") from None
    return node


def require_choice(config, path: str, allowed: Iterable[Any]) -> Any:
    """``config.<path>``, which must be one of ``allowed`` (else ``ConfigError``)."""
    value = get_field(config, path)
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"config.{path} must be one of {allowed}, got {value!r}")
    return value


def require_number(
    config,
    path: str,
    *,
    integer: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    allow_none: bool = False,
) -> Any:
    """``config.<path>`` as a number (an ``int`` with ``integer``) within the given bounds."""
    value = get_field(config, path)
    if value is None and allow_none:
        return value
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"config.{path} must be {kind}, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        op = ">" if exclusive_minimum else ">="
        raise ConfigError(f"config.{path} must be {op} {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"config.{path} must be <= {maximum}, got {value!r}")
    return value


MAX_SEED = 2**31 - 1  # the largest seed accepted: an int32, whatever numpy or JAX does with it


def require_seed(config, path: str = "seed") -> int:
    """``config.<path>``, a random seed: an integer in ``[0, MAX_SEED]`` (numpy refuses a
    negative seed only when the first random number is drawn, deep into a run)."""
    value = get_field(config, path)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(
            f"config.{path} must be an integer in [0, {MAX_SEED}] (a random seed), got {value!r}"
        )
    return value


def require_bool(config, path: str) -> bool:
    """``config.<path>``, which must be ``True`` or ``False`` (a string such as ``'no'``
    would otherwise count as true)."""
    value = get_field(config, path)
    if not isinstance(value, bool):
        raise ConfigError(f"config.{path} must be True or False, got {value!r}")
    return value


def require_int_list(config, path: str, *, minimum: int = 1) -> list[int]:
    """``config.<path>`` as a non-empty list of integers ``>= minimum``."""
    values = get_field(config, path)
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise ConfigError(f"config.{path} must be a list of integers, got {values!r}")
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ConfigError(f"config.{path} must be a non-empty list of integers, got {values!r}")
    if min(values) < minimum:
        raise ConfigError(f"config.{path} entries must be >= {minimum}, got {values!r}")
    return values


def nfe_rounding(config, path: str = "sampler") -> str:
    """``config.<path>.nfe_rounding`` (``solvers.NFE_ROUNDINGS``; ``"exact"`` when absent):
    whether a budget a method cannot spend exactly is refused or rounded up."""
    if get_field(config, path).get("nfe_rounding") is None:
        return "exact"
    return require_choice(config, f"{path}.nfe_rounding", NFE_ROUNDINGS)


def check_budget(config, path: str, nfe: Any, choice: MethodChoice, rounding: str) -> None:
    """``nfe`` (from ``config.<path>``) is a budget ``choice`` accepts: an integer in
    ``[1, MAX_NFE]`` that it spends exactly (``MethodSpec.num_steps``) unless ``rounding`` is
    ``"up"``. ``ConfigError`` naming the field, the budget and the method. O(1)."""
    spec = solvers.get_method(choice.method)
    options = dict(choice.options)
    afs = bool(options.pop("afs", False))
    try:
        spec.check_nfe(nfe, choice.order)
        spec.num_steps(nfe, choice.order, options, afs=afs, rounding=rounding)
    except solvers.MethodArgumentError as err:
        raise ConfigError(f"config.{path} entry {nfe!r}: {err.problem}") from None


def require_nfe_list(
    config, path: str, methods: Iterable[MethodChoice], rounding: str | None = None
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
            check_budget(config, path, nfe, choice, rounding)
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
