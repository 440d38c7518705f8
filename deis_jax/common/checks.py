"""Start-up checks of config values: ``ConfigError`` and the ``require_*`` helpers.

A bad value raises :class:`ConfigError` naming the field (its dotted path) and the allowed
values. These checks know nothing of samplers or models: the sampler and schedule checks are
``deis_jax.experiments.validation``, a model family checks its own block
(``deis_jax.models``). :func:`first_line` is the one-line summary of an exception from a
library that such messages quote. Imports nothing of deis_jax.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


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


def first_line(err: BaseException, limit: int = 300) -> str:
    """``'<type>: <first line of the message>'``, at most ``limit`` characters of it (what a
    one-line error says of an exception from a library)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:limit] if text else ''}"
