"""deis_jax entry point.

    python main.py --config=configs/gmm_vpsde.py --workdir=runs/gmm
    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=train

``--mode`` defaults to ``config.mode`` and picks one of ``deis_jax.modes.MODES``; the config is
validated for that mode before any work. Any config field can be overridden on the command
line, e.g. ``--config.sampler.nfe=20``; method options too, including ones the config does not
list: ``--config.sampler.options.afs=true``, ``--config.sampler.options.lam=0.5`` (values
are read as in method specs: int, float, true/false, else a string).

Bad input (config file, overrides, values, --workdir, and the data, checkpoint and FID files
the mode reads) is reported in one line before any network is built.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from deis_jax.common import checkpoint_store, data, parallel
from deis_jax.common.checks import ConfigError
from deis_jax.common.files import DiskFullError
from deis_jax.evaluation import features, fid
from deis_jax.evaluation.inception import InceptionWeightsError
from deis_jax.experiments import generation
from deis_jax.experiments.workdir_lock import WorkdirLockedError
from deis_jax.models import loading
from deis_jax.modes import get_mode, run_mode
from deis_jax.sampling.diagnostics import NonFiniteSamplesError
from deis_jax.sampling.method_spec import parse_option_value
from deis_jax.training import train as training

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
flags.DEFINE_string("workdir", None, "Directory for outputs (tables, plots, checkpoints).")
flags.DEFINE_string("mode", None, "What to run; defaults to config.mode.")
flags.mark_flags_as_required(["config", "workdir"])

_OPTION_FLAG = re.compile(r"^--config\.((?:\w+\.)*options)\.(\w+)=(.*)$")
_OPTION_OVERRIDES: list[tuple[str, str, str]] = []


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
    training.TrainingDivergedError,
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


def load_config():
    """``FLAGS.config``; a config file that could not be loaded is a ``ConfigError`` naming
    it (ml_collections reports the failure only when the config is first used)."""
    config = FLAGS.config
    try:
        config.get("mode")
    except OSError as err:
        given = config_flags.get_config_filename(FLAGS["config"])
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


def check_reference(config, workdir: str) -> None:
    """The FID reference (``config.eval``) can be had: a statistics file (read by
    ``features.check_reference_stats``), the embedded digits, statistics cached in
    ``<workdir>/tables/`` (not for KID, which needs the features), or else the data split
    ``eval.reference_split`` (``DatasetNotFoundError`` saying how to prepare it)."""
    ev, name = config.eval, config.data.name
    if ev.get("reference_stats"):
        features.check_reference_stats(config)
        return
    if name in data.EMBEDDED_DATASETS:
        return
    cache = f"reference_*_{name.replace('/', '_')}_{ev.reference_split}.npz"
    if ev.kid or not glob.glob(os.path.join(workdir, "tables", cache)):
        data.get_source(config.data, ev.reference_split)


def check_inputs(name: str, config, workdir: str) -> None:
    """Every file mode ``name`` will read is there -- cheap checks, before any network is
    built: the workdir; ``train``: the tfds data; ``sample`` / ``table`` / image ``fit``: the
    checkpoint (unless ``params='random'``; its structure too, against ``jax.eval_shape`` of
    the network: ``loading.verify_sampling_params``) and, when scoring, the FID reference."""
    check_workdir(workdir)
    if name == "train":
        data.get_source(config.data, "train")
    if name not in ("sample", "table", "fit") or config.data.name == "gmm":
        return
    if name == "sample":
        params, scored = "checkpoint", False
    elif name == "table":
        params, scored = config.eval.params, True
    else:
        params, scored = config.fit.params, bool(config.fit.get("fd"))
        if scored:  # the fit mode's own validation does not read config.eval
            features.validate_eval(config)
    if params == "checkpoint":
        loading.verify_sampling_params(config, workdir)
    if scored:
        check_reference(config, workdir)


def main(argv: list[str]) -> None:
    del argv
    try:
        config = load_config()
        apply_option_flags(config, _OPTION_OVERRIDES)
    except ConfigError as err:
        raise app.UsageError(str(err)) from err
    name = FLAGS.mode or config.get("mode")
    parallel.maybe_initialize_distributed()  # a no-op unless several processes are described
    try:
        mode = get_mode(name)
        plan = mode.validate(config)
        check_inputs(name, config, FLAGS.workdir)
    except INPUT_ERRORS as err:
        raise app.UsageError(str(err)) from err
    logging.info("mode=%s workdir=%s", name, FLAGS.workdir)
    try:
        run_mode(name, config, FLAGS.workdir, plan)  # holding the workdir's lock
    except INPUT_ERRORS + RUN_ERRORS as err:
        raise app.UsageError(str(err)) from err


def one_line_errors(run: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """``run`` with its ``app.UsageError`` reported as one line on stderr, ``FATAL
    <message>`` (bad input: with a pointer to ``--help``), exit status 1 -- instead of absl's
    usage text (this module's docstring and every flag's help) above the line that matters."""

    @functools.wraps(run)
    def wrapped(argv: list[str]) -> None:
        try:
            run(argv)
        except app.UsageError as err:
            hint = "" if isinstance(err.__cause__, RUN_ERRORS) else HELP_HINT
            sys.exit(f"FATAL {err}{hint}")

    return wrapped


if __name__ == "__main__":
    sys.argv, _OPTION_OVERRIDES[:] = split_option_flags(sys.argv)
    app.run(one_line_errors(main), flags_parser=parse_flags)
