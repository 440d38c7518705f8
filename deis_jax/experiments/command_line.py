"""The command line of ``main.py``: config flags and overrides, start-up checks, and which
errors are reported as one line (bad input, or a run that stops to protect its results)."""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from deis_jax.common import checkpoint_store, data
from deis_jax.common.checks import ConfigError
from deis_jax.common.files import DiskFullError
from deis_jax.evaluation import fid
from deis_jax.evaluation.inception import InceptionWeightsError
from deis_jax.experiments import generation
from deis_jax.experiments.workdir_lock import WorkdirLockedError
from deis_jax.sampling.diagnostics import NonFiniteSamplesError
from deis_jax.sampling.method_spec import parse_option_value
from deis_jax.training.loop import TrainingDivergedError

_OPTION_FLAG = re.compile(r"^--config\.((?:\w+\.)*options)\.(\w+)=(.*)$")


def split_option_flags(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Take ``--config.<...>.options.<key>=<value>`` out of ``argv``: method options are an
    open dict, which ml_collections' flags cannot add keys to. Returns the remaining
    arguments and ``(options path, key, value text)`` triples."""
    rest, options = [], []
    for arg in argv:
        match = _OPTION_FLAG.match(arg)
        if match:
            options.append(match.groups())
        else:
            rest.append(arg)
    return rest, options


def apply_option_flags(config, options: list[tuple[str, str, str]]) -> None:
    """Set each option of :func:`split_option_flags` in ``config`` (values parsed as in
    method specs); an options path the config does not have is a ``ConfigError``."""
    for path, key, text in options:
        node = config
        for part in path.split("."):
            if part not in node:
                raise ConfigError(f"--config.{path}.{key}: config has no field {path!r}")
            node = node[part]
        with node.unlocked():  # config_flags locks the config against new keys
            node[key] = parse_option_value(text)


# Bad input found before or while running: reported as a usage error, one line, no traceback.
INPUT_ERRORS = (
    ConfigError,
    data.DatasetNotFoundError,
    checkpoint_store.CheckpointError,
    InceptionWeightsError,
    fid.StatsFileError,
)

# A run that stops to protect its results (a resume with other settings, damaged or missing
# finished work, non-finite samples, a workdir another run holds, a full disk): the message
# says what and what to do; no traceback.
RUN_ERRORS = (
    generation.DifferentRunError,
    generation.IncompleteSamplesError,
    NonFiniteSamplesError,
    TrainingDivergedError,
    WorkdirLockedError,
    DiskFullError,
)
HELP_HINT = " (python main.py --help lists the flags)"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; an override of a field the config does not have
    (``--config.sampler.nfee=3``: ml_collections raises a ``KeyError`` / ``AttributeError``
    with its "did you mean") exits with one line naming the flag instead of a traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as err:
        inner: BaseException = err
        while inner.args and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]  # ml_collections wraps the KeyError that has the message
        key, _, hint = str(inner.args[0] if inner.args else inner).partition("\n")
        key = key.strip("'\"")
        given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        named = [f for f in given if key in f[len("--config.") :].split(".")] or ["--config"]
        hint = f" ({hint.strip()})" if hint.strip() else ""
        sys.exit(f"FATAL Flags parsing error: {named[0]}: the config has no field {key!r}{hint}")


def load_config(flag_values: flags.FlagValues):
    """``--config`` of ``flag_values``; a config file that could not be loaded is a
    ``ConfigError`` naming it (ml_collections reports the failure only when the config is
    first used)."""
    config = flag_values.config
    try:
        config.get("mode")
    except OSError as err:
        given = config_flags.get_config_filename(flag_values["config"])
        path = given.split(":", 1)[0]
        if not os.path.isfile(path):
            raise ConfigError(f"--config={given}: no config file at {path!r}") from None
        cause = err.__cause__ or err
        raise ConfigError(f"--config={given}: {' '.join(str(cause).split())}") from None
    return config


def check_workdir(workdir: str) -> None:
    """``--workdir`` must be a directory, or a path where one can be created, that this
    process may write in (``ConfigError`` naming it)."""
    if not workdir:
        raise ConfigError("--workdir must not be empty")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir}: this is a file, not a directory; pass a "
                          f"directory (it is created if missing)")  # fmt: skip
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--workdir={workdir}: cannot create it, '{existing}' is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={workdir}: no permission to write in '{existing}'; pass "
                          f"a directory you can write to")  # fmt: skip
