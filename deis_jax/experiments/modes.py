"""The run modes of ``main.py``: thin, independent pages over the library.

Each mode is one package of ``deis_jax.experiments`` (its cells and report beside it) with
``validate(config) -> plan`` (every check of the config, before any work; a bad value raises
``ConfigError`` naming the field and what is allowed; the plan holds what validation built:
the schedule, the cells, ...), ``check_inputs(config, workdir, plan)`` (the files it will
read are there and fit, before any network is built) and ``run(config, workdir, plan=None)``
(``plan=None`` validates first). Modes never import each other; what two modes share lives
in the library. :func:`run_mode` runs one holding the workdir's lock (one run per workdir).
"""

from __future__ import annotations

from types import ModuleType

from deis_jax.common.checks import ConfigError
from deis_jax.experiments import compare, fit, sample, sweep, table, train
from deis_jax.experiments.workdir_lock import workdir_lock

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


def run_mode(name: str | None, config, workdir: str, plan=None):
    """Run mode ``name`` in this process, holding the workdir's lock
    (``deis_jax.experiments.workdir_lock``: one run per workdir), with ``plan`` (None: validate
    ``config`` first). What ``main.py`` does; tests call it directly."""
    mode = get_mode(name)
    plan = mode.validate(config) if plan is None else plan
    with workdir_lock(workdir, name):
        return mode.run(config, workdir, plan)
