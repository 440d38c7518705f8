"""deis_jax entry point.

    python main.py --config=configs/gmm_vpsde.py --workdir=runs/gmm
    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=train

``--mode`` defaults to ``config.mode`` and picks one of ``deis_jax.modes.MODES``; the config is
validated for that mode before any work. Any config field can be overridden on the command
line, e.g. ``--config.sampler.nfe=20``.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from deis_jax import parallel
from deis_jax.config_validation import ConfigError
from deis_jax.modes import get_mode

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
flags.DEFINE_string("workdir", None, "Directory for outputs (tables, plots, checkpoints).")
flags.DEFINE_string("mode", None, "What to run; defaults to config.mode.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    config = FLAGS.config
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
    app.run(main)
