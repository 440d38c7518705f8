"""Start-up validation of ``ml_collections`` configs.

Every mode module (``deis_jax.modes.<mode>``) exposes ``validate(config)``; ``validate_mode``
checks the mode name and calls it before any work starts. A bad value raises ``ConfigError``
naming the field (dotted path) and the allowed values.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any

from deis_jax import modes


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field and what is allowed."""


def available_modes() -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules(modes.__path__)))


def validate_mode(mode: str | None, config) -> None:
    allowed = available_modes()
    if mode not in allowed:
        raise ConfigError(f"mode (--mode or config.mode) must be one of {allowed}, got {mode!r}")
    importlib.import_module(f"deis_jax.modes.{mode}").validate(config)


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


def require_int_list(config, path: str, *, minimum: int = 1) -> list[int]:
    values = get_field(config, path)
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise ConfigError(f"config.{path} must be a list of integers, got {values!r}")
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ConfigError(f"config.{path} must be a non-empty list of integers, got {values!r}")
    if min(values) < minimum:
        raise ConfigError(f"config.{path} entries must be >= {minimum}, got {values!r}")
    return values


def validate_sde(config):
    """Check ``config.sde`` and return the schedule it describes."""
    from deis_jax.build import schedule_from_config
    from deis_jax.sampling.sde import SDE_NAMES, VP_BETA_SCHEDULES

    name = require_choice(config, "sde.name", SDE_NAMES)
    if name == "vpsde" and config.sde.get("schedule") is not None:
        require_choice(config, "sde.schedule", VP_BETA_SCHEDULES)
    for field in ("beta_min", "beta_max", "sigma_min", "sigma_max", "beta_start", "beta_end"):
        if config.sde.get(field) is not None:
            require_number(config, f"sde.{field}", minimum=0, exclusive_minimum=True)
    try:
        return schedule_from_config(config.sde)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config.sde is invalid: {err}") from None


def validate_sampler(config, schedule=None, path: str = "sampler"):
    """Check ``config.<path>`` against the method registry; build its table as a dry run."""
    from deis_jax.build import sampler_from_config
    from deis_jax.sampling import solvers
    from deis_jax.sampling.timesteps import GRID_KINDS

    schedule = validate_sde(config) if schedule is None else schedule
    method = require_choice(config, f"{path}.method", solvers.method_names())
    spec = solvers.get_method(method)
    order = get_field(config, f"{path}.order")
    if order is None:
        order = spec.default_order
    elif order not in spec.orders:
        raise ConfigError(
            f"config.{path}.order must be one of {spec.orders} for method {method!r}, got {order!r}"
        )
    options = dict(get_field(config, path).get("options") or {})
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ConfigError(
            f"config.{path}.options has unknown key(s) {unknown} for method {method!r}; "
            f"allowed: {spec.options}"
        )
    require_number(config, f"{path}.nfe", integer=True, minimum=spec.minimum_nfe(order, options))
    if get_field(config, path).get("grid") is not None:
        require_choice(config, f"{path}.grid", GRID_KINDS)
    section = get_field(config, path)
    t0 = section.get("t0")
    t1 = section.get("t1")
    t0 = schedule.default_t0 if t0 is None else t0
    t1 = schedule.default_t1 if t1 is None else t1
    if not (t0 > 0 or (schedule.is_discrete and t0 >= 0)):
        raise ConfigError(f"config.{path}.t0 must be > 0, got {t0!r}")
    if not t0 < t1:
        raise ConfigError(f"config.{path}.t0 must be < config.{path}.t1, got t0={t0}, t1={t1}")
    if t1 > schedule.t_max:
        raise ConfigError(f"config.{path}.t1 must be <= {schedule.t_max}, got {t1!r}")
    try:
        return sampler_from_config(section, schedule, lambda x, t: x)
    except ValueError as err:
        raise ConfigError(f"config.{path} is invalid: {err}") from None
