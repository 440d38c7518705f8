"""Bad input to ``main.py`` is one clear line, before any network is built.

``main.main()`` runs in this process with real flags (``run_main``); each case checks that the
usage error names the path or field at fault and what to do, in a single line. The expensive
steps -- initialising a network (``training.init_state``, what cost 83 s for the 106M-parameter
CIFAR-10 model before the missing dataset was reported, or ``Module.init``) and reading
parameters -- raise if reached (fixture ``early``), so a check that came too late fails the
test. The damaged-checkpoint cases are found by reading them, with a tiny network.
"""

from __future__ import annotations

import logging
import os
import sys

import flax.linen as nn
import pytest
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import main  # noqa: E402
from deis_jax.models import checkpoints  # noqa: E402
from deis_jax.training import train as training  # noqa: E402

FLAGS = flags.FLAGS
DIGITS = f"--config={ROOT}/configs/vpsde_digits.py"
CIFAR10 = f"--config={ROOT}/configs/vpsde_cifar10.py"
# a tiny digits network, so that restoring into it (the corrupt-checkpoint case) is quick
TINY = ("--config.model.nf=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()")


@pytest.fixture(autouse=True)
def clean_flags(monkeypatch):
    """No tfds data anywhere; the parsed flags (and the absl logger level that parsing the
    verbosity flag sets) are reset afterwards."""
    monkeypatch.setenv("TFDS_DATA_DIR", os.path.join(ROOT, "no_such_tfds_dir"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # parse() sets it, as python main.py does
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    yield
    for name in [n for n in FLAGS if n.startswith("config.")]:
        delattr(FLAGS, name)  # the override flags ml_collections registered while parsing
    FLAGS.unparse_flags()
    main._OPTION_OVERRIDES.clear()
    absl_logger.setLevel(level)  # unparsing the verbosity flag set it to WARNING


@pytest.fixture
def early(monkeypatch):
    """Building or loading a network is an error: the bad input must be reported first."""

    def built(*args, **kwargs):
        raise AssertionError("a network was built before the bad input was reported")

    monkeypatch.setattr(training, "init_state", built)  # train; restoring into a network
    monkeypatch.setattr(nn.Module, "init", built)  # an untrained network (params='random')
    monkeypatch.setattr(checkpoints, "load_params", built)  # converted checkpoints
    monkeypatch.setattr(checkpoints, "load_score_sde_params", built)  # score_sde files


def parse(*args: str) -> None:
    """Parse ``main.py`` flags as ``python main.py <args>`` would."""
    sys.argv, main._OPTION_OVERRIDES[:] = main.split_option_flags(["main.py", *args])
    FLAGS.unparse_flags()
    main.parse_flags(sys.argv)  # ml_collections reads config overrides from sys.argv


def run_main(*args: str) -> str:
    """``python main.py <args>`` in this process; returns the usage error's message, checked
    to be a single line."""
    parse(*args)
    with pytest.raises(app.UsageError) as info:
        main.main([])
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    return message


def test_cifar10_train_without_dataset_fails_before_building_the_model(tmp_path, early):
    data_dir = str(tmp_path / "tfds")
    message = run_main(
        CIFAR10, f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={data_dir}"
    )
    assert "Dataset 'cifar10' (split 'train') is not prepared" in message
    assert f"data_dir={data_dir!r} (config.data.data_dir)" in message
    assert f"scripts/prepare_data.py --dataset=cifar10 --data_dir={data_dir}" in message


def test_digits_sample_without_checkpoint_says_train_the_digits_model(tmp_path, early):
    message = run_main(DIGITS, f"--workdir={tmp_path}", "--mode=sample")
    assert f"no training checkpoint in '{tmp_path / 'checkpoints'}'" in message
    assert f"python main.py --config=configs/vpsde_digits.py --workdir={tmp_path} --mode=train" in (
        message
    )
    assert "cifar10" not in message and "score_sde" not in message


def test_cifar10_sample_without_checkpoint_says_convert_the_published_model(tmp_path, early):
    message = run_main(CIFAR10, f"--workdir={tmp_path}", "--mode=sample")
    assert f"no training checkpoint in '{tmp_path / 'checkpoints'}'" in message
    assert "download vp/cifar10_ddpmpp_deep_continuous/checkpoint_<N>" in message
    assert "--model_config vp_cifar10_ddpmpp_deep_continuous" in message
    assert (
        "--config.sampling.checkpoint=checkpoints/converted/vp_cifar10_ddpmpp_deep_continuous_<N>"
        in message
    )


def test_table_without_checkpoint_is_reported_before_loading(tmp_path, early):
    message = run_main(DIGITS, f"--workdir={tmp_path}", "--mode=table")
    assert f"no training checkpoint in '{tmp_path / 'checkpoints'}'" in message


def test_table_without_fid_reference_data(tmp_path, early):
    weights = tmp_path / "inception.npz"
    weights.write_bytes(b"not checked before the run")
    message = run_main(
        CIFAR10, f"--workdir={tmp_path}", "--mode=table", "--config.eval.params=random",
        f"--config.eval.inception_weights={weights}",
    )  # fmt: skip
    assert "Dataset 'cifar10' (split 'train') is not prepared" in message
    assert "no_such_tfds_dir" in message


def test_workdir_that_is_a_file(tmp_path, early):
    path = tmp_path / "file"
    path.write_text("")
    message = run_main(DIGITS, f"--workdir={path}", "--mode=sample")
    assert message.startswith(f"--workdir={path}: this is a file, not a directory")


def test_workdir_below_a_file(tmp_path, early):
    path = tmp_path / "file"
    path.write_text("")
    message = run_main(DIGITS, f"--workdir={path / 'run'}", "--mode=train")
    assert message == f"--workdir={path / 'run'}: cannot create it, '{path}' is a file"


def test_workdir_that_is_not_writable(tmp_path, monkeypatch, early):
    monkeypatch.setattr(main.os, "access", lambda path, mode: path != str(tmp_path))
    message = run_main(DIGITS, f"--workdir={tmp_path / 'run'}", "--mode=train")
    assert f"--workdir={tmp_path / 'run'}: no permission to write in '{tmp_path}'" in message


def test_corrupt_training_checkpoint(tmp_path):
    step = tmp_path / "checkpoints" / "500"
    step.mkdir(parents=True)
    (step / "garbage").write_text("not a checkpoint")
    message = run_main(DIGITS, f"--workdir={tmp_path}", "--mode=sample", *TINY)
    assert str(tmp_path / "checkpoints") in message and "step 500" in message


def test_sampling_checkpoint_that_does_not_exist(tmp_path, early):
    path = tmp_path / "converted"
    message = run_main(DIGITS, f"--workdir={tmp_path}", f"--config.sampling.checkpoint={path}",
                       "--mode=sample")  # fmt: skip
    assert f"config.sampling.checkpoint: no file or directory at '{path}'" in message
    assert "scripts/convert_score_sde_checkpoint.py" in message


def test_sampling_checkpoint_directory_without_its_files(tmp_path, early):
    path = tmp_path / "converted"
    path.mkdir()
    (path / "garbage").write_text("x")
    message = run_main(DIGITS, f"--workdir={tmp_path}", f"--config.sampling.checkpoint={path}",
                       "--mode=sample")  # fmt: skip
    assert f"'{path}' is not a converted checkpoint (it has no {checkpoints.METADATA_FILE})" in (
        message
    )


def test_damaged_converted_checkpoint(tmp_path):
    path = tmp_path / "converted"
    path.mkdir()
    (path / checkpoints.METADATA_FILE).write_text("{}")  # the sidecar, but no Orbax files
    message = run_main(DIGITS, f"--workdir={tmp_path}", f"--config.sampling.checkpoint={path}",
                       "--mode=sample")  # fmt: skip
    assert f"config.sampling.checkpoint: '{path}' cannot be loaded" in message


def test_damaged_score_sde_checkpoint_file(tmp_path):
    path = tmp_path / "checkpoint_8"
    path.write_bytes(b"\x00 not msgpack")
    message = run_main(DIGITS, f"--workdir={tmp_path}", f"--config.sampling.checkpoint={path}",
                       "--mode=sample")  # fmt: skip
    assert f"config.sampling.checkpoint: '{path}' cannot be loaded" in message
    assert "download it again" in message


def test_config_file_that_does_not_exist(tmp_path, early):
    message = run_main("--config=configs/no_such_config.py", f"--workdir={tmp_path}")
    assert message == (
        "--config=configs/no_such_config.py: no config file at 'configs/no_such_config.py'"
    )


def test_tables_config_of_an_experiment_that_does_not_exist(tmp_path, early):
    message = run_main("--config=configs/tables.py:no_such_config", f"--workdir={tmp_path}")
    assert message.startswith(
        "--config=configs/tables.py:no_such_config: there is no experiment config "
        "configs/no_such_config.py"
    )


def test_override_of_a_field_the_config_does_not_have(tmp_path, early):
    with pytest.raises(SystemExit) as info:
        parse(DIGITS, f"--workdir={tmp_path}", "--config.sampler.nfee=3")
    assert str(info.value) == (
        "FATAL Flags parsing error: --config.sampler.nfee: the config has no field 'nfee' "
        '(Did you mean "nfe" instead of "nfee"?)'
    )


@pytest.mark.parametrize("error", ["different", "incomplete", "nonfinite", "diverged", "stats"])
def test_a_run_that_stops_to_protect_its_results_is_a_usage_error(tmp_path, monkeypatch, error):
    """A resume with other settings, damaged finished work or NaN samples: the run's own
    message, no traceback (``main.RUN_ERRORS``)."""
    import numpy as np

    from deis_jax.evaluation import fid
    from deis_jax.experiments import generation
    from deis_jax.modes import compare
    from deis_jax.sampling.diagnostics import NonFiniteSamplesError

    raised = {
        "different": generation.DifferentRunError("seed: 3 (on disk) vs 4 (this run)"),
        "incomplete": generation.IncompleteSamplesError("shard_000001.npz is damaged"),
        "nonfinite": NonFiniteSamplesError(np.array([3, 7])),
        "diverged": training.TrainingDivergedError("loss is nan at step 12"),
        "stats": fid.StatsFileError("reference.npz is damaged: replace it"),
    }[error]

    def stop(*args, **kwargs):
        raise raised

    monkeypatch.setattr(compare, "run", stop)
    parse(f"--config={ROOT}/configs/gmm_vpsde.py", f"--workdir={tmp_path / 'w'}")
    with pytest.raises(app.UsageError) as info:
        main.main([])
    assert str(info.value) == str(raised) and info.value.__cause__ is raised
