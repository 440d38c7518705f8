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
