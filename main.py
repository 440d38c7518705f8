"""deis_jax entry point.

    python main.py --config=configs/gmm_vpsde.py --workdir=runs/gmm
    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=train

``--mode`` defaults to ``config.mode``. Each mode is a module ``deis_jax.modes.<mode>`` with a
``run(config, workdir)`` function; the config is validated for that mode before any work.
Any config field can be overridden on the command line, e.g. ``--config.sampler.nfe=20``.
"""

from __future__ import annotations

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

from deis_jax import parallel
from deis_jax.config_validation import ConfigError, validate_mode

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
flags.DEFINE_string("workdir", None, "Directory for outputs (tables, plots, checkpoints).")
flags.DEFINE_string("mode", None, "What to run; defaults to config.mode.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    config = FLAGS.config
    mode = FLAGS.mode or config.get("mode")
    parallel.maybe_initialize_distributed()  # a no-op unless several processes are described
    try:
        validate_mode(mode, config)
    except ConfigError as err:
        raise app.UsageError(str(err)) from err
    logging.info("mode=%s workdir=%s", mode, FLAGS.workdir)
    importlib.import_module(f"deis_jax.modes.{mode}").run(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
