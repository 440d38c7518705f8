"""deis_jax entry point.

    python main.py --config=configs/gmm_vpsde.py --workdir=runs/gmm
    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=train

``--mode`` defaults to ``config.mode`` and picks one of ``deis_jax.modes.MODES``; the config is
validated for that mode before any work. Any config field can be overridden on the command
line, e.g. ``--config.sampler.nfe=20``; method options too, including ones the config does not
list: ``--config.sampler.options.afs=true``, ``--config.sampler.options.lam=0.5`` (values
are read as in method specs: int, float, true/false, else a string).
"""

from __future__ import annotations

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deis_jax import parallel
from deis_jax.config_validation import ConfigError
from deis_jax.modes import get_mode
from deis_jax.sampling.method_spec import parse_option_value

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


def main(argv: list[str]) -> None:
    del argv
    config = FLAGS.config
    try:
        apply_option_flags(config, _OPTION_OVERRIDES)
    except ConfigError as err:
        raise app.UsageError(str(err)) from err
    name = FLAGS.mode or config.get("mode")
    parallel.maybe_initialize_distributed()  # a no-op unless several processes are described
    try:
        mode = get_mode(name)
        plan = mode.validate(config)
    except ConfigError as err:
        raise app.UsageError(str(err)) from err
    logging.info("mode=%s workdir=%s", name, FLAGS.workdir)
    mode.run(config, FLAGS.workdir, plan)


if __name__ == "__main__":
    sys.argv, _OPTION_OVERRIDES[:] = split_option_flags(sys.argv)
    app.run(main)
