"""The run modes of ``main.py``: thin, independent pages over the library.

Each mode module has ``validate(config) -> plan`` (every check, before any work; a bad value
raises ``ConfigError`` naming the field and what is allowed; the plan holds what validation
built: the schedule, the cells, ...) and ``run(config, workdir, plan=None)`` (``plan=None``
validates first). Modes never import each other; what two modes share lives in the library.
"""

from __future__ import annotations

from types import ModuleType

from deis_jax.config_validation import ConfigError
from deis_jax.modes import compare, fit, sample, sweep, table, train

MODES: dict[str, ModuleType] = {
    "compare": compare,
    "fit": fit,
    "sample": sample,
    "sweep": sweep,
    "table": table,
    "train": train,
}


def get_mode(name: str | None) -> ModuleType:
    """The mode module called ``name`` (``ConfigError`` naming the allowed modes)."""
    if name not in MODES:
        raise ConfigError(
            f"mode (--mode or config.mode) must be one of {tuple(sorted(MODES))}, got {name!r}"
        )
    return MODES[name]


def run_mode(name: str | None, config, workdir: str):
    """Validate ``config`` for mode ``name`` and run it in this process (what ``main.py``
    does; tests call it directly)."""
    mode = get_mode(name)
    return mode.run(config, workdir, mode.validate(config))
