"""deis_jax entry point: flags -> config -> mode.validate -> mode.check_inputs -> mode.run.

    python main.py --config=configs/gmm_vpsde.py --workdir=runs/gmm
    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=train

``--mode`` defaults to ``config.mode`` and picks one of ``deis_jax.experiments.modes.MODES``.
Any config field can be overridden on the command line (``--config.sampler.nfe=20``), method
options too (``--config.sampler.options.afs=true``). Bad input (config, overrides, values,
--workdir, and the data, checkpoint and FID files the mode reads) is reported in one line
before any network is built (``deis_jax.experiments.command_line``).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from deis_jax.common import parallel
from deis_jax.common.checks import ConfigError
from deis_jax.experiments.command_line import (
    HELP_HINT,
    INPUT_ERRORS,
    RUN_ERRORS,
    apply_option_flags,
    check_workdir,
    load_config,
    parse_flags,
    split_option_flags,
)
from deis_jax.experiments.modes import get_mode, run_mode

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
flags.DEFINE_string("workdir", None, "Directory for outputs (tables, plots, checkpoints).")
flags.DEFINE_string("mode", None, "What to run; defaults to config.mode.")
flags.mark_flags_as_required(["config", "workdir"])
_OPTION_OVERRIDES: list[tuple[str, str, str]] = []  # --config.<...>.options.<key>=<value>


def main(argv: list[str]) -> None:
    """Validate everything the mode will read, then run it holding the workdir's lock."""
    del argv
    try:
        config = load_config(FLAGS)
        apply_option_flags(config, _OPTION_OVERRIDES)
    except ConfigError as err:
        raise app.UsageError(str(err)) from err
    name = FLAGS.mode or config.get("mode")
    parallel.maybe_initialize_distributed()  # a no-op unless several processes are described
    try:
        mode = get_mode(name)
        plan = mode.validate(config)
        check_workdir(FLAGS.workdir)
        mode.check_inputs(config, FLAGS.workdir, plan)
    except INPUT_ERRORS as err:
        raise app.UsageError(str(err)) from err
    logging.info("mode=%s workdir=%s", name, FLAGS.workdir)
    try:
        run_mode(name, config, FLAGS.workdir, plan)
    except INPUT_ERRORS + RUN_ERRORS as err:
        raise app.UsageError(str(err)) from err


def one_line_errors(run: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """``run`` with its ``app.UsageError`` reported as one line on stderr, ``FATAL
    <message>`` (bad input: with a pointer to ``--help``), exit status 1."""

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
