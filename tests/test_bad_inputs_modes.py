"""Bad input to ``main.py`` is one clear line, before any network is built.

``main.main()`` runs in this process with real flags (``run_main``); each case checks that the
usage error names the path or field at fault and what to do, in a single line. The expensive
steps -- initialising a network (``training.init_state``, what cost 83 s for the 106M-parameter
CIFAR-10 model before the missing dataset was reported, or ``Module.init``) and reading
parameters -- raise if reached (fixture ``early``; ``jax.eval_shape`` of them, which computes
nothing, is allowed), so a check that came too late fails the test. The damaged-checkpoint
cases are found by reading their structure, with a tiny network. ``main.py`` itself (a
subprocess) prints one line for a usage error.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from absl import app, flags
from flax import serialization

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import main  # noqa: E402
from deis_jax.common import checkpoint_store  # noqa: E402
from deis_jax.common.checks import MAX_SEED, ConfigError  # noqa: E402
from deis_jax.experiments.modes import get_mode  # noqa: E402
from deis_jax.experiments.table import cells as tables  # noqa: E402
from deis_jax.models import checkpoints, loading  # noqa: E402
from deis_jax.models.score_sde import abstract_params, published  # noqa: E402
from deis_jax.models.score_sde.family import model_config  # noqa: E402
from deis_jax.training import loop as training  # noqa: E402

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


class BuiltTooEarly(BaseException):
    """A network was built or loaded before the bad input was reported (a BaseException:
    no ``except Exception`` of the loading code turns it into a checkpoint error)."""


@pytest.fixture
def early(monkeypatch):
    """Building or loading a network is an error: the bad input must be reported first.
    Shapes from ``jax.eval_shape`` of the network's init (abstract, nothing computed or
    compiled) are allowed."""
    abstract = [0]
    eval_shape = jax.eval_shape

    def shapes_only(*args, **kwargs):
        abstract[0] += 1
        try:
            return eval_shape(*args, **kwargs)
        finally:
            abstract[0] -= 1

    def guard(real):
        def built(*args, **kwargs):
            if not abstract[0]:
                raise BuiltTooEarly("a network was built before the bad input was reported")
            return real(*args, **kwargs)

        return built

    monkeypatch.setattr(jax, "eval_shape", shapes_only)
    monkeypatch.setattr(training, "init_state", guard(training.init_state))  # train; restoring
    monkeypatch.setattr(nn.Module, "init", guard(nn.Module.init))  # an untrained network
    monkeypatch.setattr(checkpoints, "load_params", guard(checkpoints.load_params))
    for name in ("load_converted_params", "load_score_sde_params"):
        monkeypatch.setattr(published, name, guard(getattr(published, name)))


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
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path))
    message = run_main(DIGITS, f"--workdir={tmp_path / 'run'}", "--mode=train")
    assert f"--workdir={tmp_path / 'run'}: no permission to write in '{tmp_path}'" in message


def test_corrupt_training_checkpoint(tmp_path, early):
    step = tmp_path / "checkpoints" / "500"
    step.mkdir(parents=True)
    (step / "garbage").write_text("not a checkpoint")
    message = run_main(DIGITS, f"--workdir={tmp_path}", "--mode=sample", *TINY)
    assert message.startswith(f"no checkpoint in {tmp_path / 'checkpoints'} can be restored")
    assert "step 500: no deis_integrity.json and its metadata is unreadable" in message


def _tiny_digits_config():
    """The digits config with the network of ``TINY``."""
    from configs import vpsde_digits

    config = vpsde_digits.get_config()
    config.model.nf, config.model.ch_mult, config.model.attn_resolutions = 8, (1,), ()
    return config


def _zeros(tree):
    return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), tree)


def _save_training_checkpoint(workdir, config, step: int) -> None:
    """A training checkpoint (zeros) of ``config``'s network in ``<workdir>/checkpoints``."""
    model, tx = loading.build_model(config), training.optimizer_from_config(config.training)
    shape = loading.image_shape(config)
    state = jax.eval_shape(lambda: training.init_state(model, tx, jax.random.key(0), shape))
    mngr = checkpoint_store.checkpoint_manager(str(workdir / "checkpoints"))
    checkpoint_store.save_checkpoint(mngr, step, _zeros(state))
    mngr.close()


def test_training_checkpoint_of_another_network(tmp_path, early):
    """An intact training checkpoint of a network with nf=8, sampled with nf=16: refused
    before the nf=16 network is built, naming the checkpoint and the first differing shape."""
    _save_training_checkpoint(tmp_path, _tiny_digits_config(), step=2)
    message = run_main(DIGITS, f"--workdir={tmp_path}", "--mode=sample", *TINY,
                       "--config.model.nf=16")  # fmt: skip
    folder = tmp_path / "checkpoints" / "2"
    assert message.startswith(f"checkpoint {folder} is intact but cannot be restored into this")
    assert "parameters do not match the model: shape mismatch at" in message


@pytest.mark.parametrize("kind", ["converted", "score_sde", "training"])
def test_checkpoints_of_the_network_pass_the_start_up_check(tmp_path, early, kind):
    """The structure checks accept the checkpoint of the config's own network (a raw
    score_sde file in flax 0.3's GroupNorm layout, which loading converts, too)."""
    config = _tiny_digits_config()
    params = _zeros(abstract_params(model_config(config)))
    path = tmp_path / "checkpoint_8"
    if kind == "converted":
        checkpoints.save_params(path, params)
    elif kind == "score_sde":
        old = jax.tree_util.tree_map_with_path(
            lambda p, a: a.reshape(1, 1, 1, -1) if "GroupNorm" in jax.tree_util.keystr(p) else a,
            params,
        )  # fmt: skip
        path.write_bytes(serialization.msgpack_serialize({"params_ema": old, "step": 8}))
    else:
        _save_training_checkpoint(tmp_path, config, step=2)
    if kind != "training":
        config.sampling.checkpoint = str(path)
    loading.verify_sampling_params(config, str(tmp_path))


@pytest.mark.parametrize("kind", ["converted", "score_sde"])
def test_sampling_checkpoint_of_another_network(tmp_path, early, kind):
    """Parameters of a network with nf=8 (converted, or a raw score_sde file), sampled with
    nf=16: refused from the checkpoint's structure, before any network is built."""
    params = _zeros(abstract_params(model_config(_tiny_digits_config())))
    path = tmp_path / "checkpoint_8"
    if kind == "converted":
        checkpoints.save_params(path, params)
    else:
        path.write_bytes(serialization.msgpack_serialize({"params_ema": params, "step": 8}))
    message = run_main(DIGITS, f"--workdir={tmp_path}", "--mode=sample", *TINY,
                       "--config.model.nf=16", f"--config.sampling.checkpoint={path}")  # fmt: skip
    assert message.startswith(f"config.sampling.checkpoint: '{path}' cannot be loaded (ValueError")
    assert "do not match the model: shape mismatch at" in message
    assert "holds another network than config.model" in message


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


def test_damaged_converted_checkpoint(tmp_path, early):
    path = tmp_path / "converted"
    path.mkdir()
    (path / checkpoints.METADATA_FILE).write_text("{}")  # the sidecar, but no Orbax files
    message = run_main(DIGITS, f"--workdir={tmp_path}", f"--config.sampling.checkpoint={path}",
                       "--mode=sample")  # fmt: skip
    assert f"config.sampling.checkpoint: '{path}' cannot be loaded" in message


def test_damaged_score_sde_checkpoint_file(tmp_path, early):
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


@pytest.mark.parametrize(
    "error", ["different", "incomplete", "nonfinite", "diverged", "stats", "disk", "locked"]
)
def test_a_run_that_stops_to_protect_its_results_is_a_usage_error(tmp_path, monkeypatch, error):
    """A resume with other settings, damaged finished work, NaN samples, a full disk or a
    workdir another run holds: the run's own message, no traceback (``main.RUN_ERRORS``)."""
    import errno

    from deis_jax.common.files import DiskFullError
    from deis_jax.evaluation import fid
    from deis_jax.experiments import compare, generation
    from deis_jax.experiments.workdir_lock import WorkdirLockedError
    from deis_jax.sampling.diagnostics import NonFiniteSamplesError

    full = OSError(errno.ENOSPC, "No space left on device")
    raised = {
        "different": generation.DifferentRunError("seed: 3 (on disk) vs 4 (this run)"),
        "incomplete": generation.IncompleteSamplesError("shard_000001.npz is damaged"),
        "nonfinite": NonFiniteSamplesError(np.array([3, 7])),
        "diverged": training.TrainingDivergedError("loss is nan at step 12"),
        "stats": fid.StatsFileError("reference.npz is damaged: replace it"),
        "disk": DiskFullError(str(tmp_path / "w" / "results.jsonl"), full),
        "locked": WorkdirLockedError(f"--workdir={tmp_path / 'w'} is in use by another run"),
    }[error]

    def stop(*args, **kwargs):
        raise raised

    monkeypatch.setattr(compare, "run", stop)
    parse(f"--config={ROOT}/configs/gmm_vpsde.py", f"--workdir={tmp_path / 'w'}")
    with pytest.raises(app.UsageError) as info:
        main.main([])
    assert str(info.value) == str(raised) and info.value.__cause__ is raised


@pytest.mark.parametrize("damage", ["garbage", "dimension"])
def test_corrupt_fid_statistics(tmp_path, early, damage):
    """``config.eval.reference_stats`` is read at start-up, before any network is built."""
    path = tmp_path / "reference.npz"
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 torn")
    else:
        np.savez(path, mu=np.zeros(10), sigma=np.eye(10))
    message = run_main(
        DIGITS, f"--workdir={tmp_path}", "--mode=table", "--config.eval.params=random",
        f"--config.eval.reference_stats={path}",
    )  # fmt: skip
    assert message.startswith("config.eval.reference_stats: ")
    if damage == "garbage":
        assert f"statistics file '{path}' is damaged or not a .npz" in message
    else:
        assert "holds 10-d statistics, metric 'fd_digits' gives 64-d features" in message


SEED_CONFIGS = {
    "compare": "gmm_vpsde",
    "fit": "fit_gmm",
    "sample": "vpsde_digits",
    "train": "vpsde_digits",
    "table": "tables",
    "sweep": "sweeps/gmm_methods.py",
}


@pytest.mark.parametrize("mode", sorted(SEED_CONFIGS))
@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1])
def test_every_mode_refuses_a_bad_seed_at_start_up(mode, seed):
    """numpy refused ``seed=-1`` only when drawing, 76 s into a run."""
    import importlib

    from deis_jax.experiments.sweep import cells as sweep

    name = SEED_CONFIGS[mode]
    if mode == "sweep":
        config = sweep.load_config_file(os.path.join(ROOT, "configs", name))
    else:
        config = importlib.import_module(f"configs.{name}").get_config()
    config.seed = seed
    with pytest.raises(ConfigError) as info:
        get_mode(mode).validate(config)
    assert str(info.value).endswith(
        f"config.seed must be an integer in [0, {MAX_SEED}] (a random seed), got {seed!r}"
    )


def test_main_prints_one_line_for_bad_input():
    """Not absl's usage text (the module docstring and every flag's help): the error and a
    pointer to --help, exit status 1."""
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/gmm_vpsde.py", "--workdir=/nonexistent/x",
         "--config.seed=-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1
    assert lines == [
        f"FATAL config.seed must be an integer in [0, {MAX_SEED}] (a random seed), got -1"
        f"{main.HELP_HINT}"
    ], result.stderr


def test_table_rows_by_ascii_name_in_any_case():
    """``ρ2Heun`` is hard to type: ``rho2heun`` (any case, any punctuation) names it too."""
    spec = tables.TABLES["deis_cifar10"]
    rows = spec.select(["rho2heun", "RHOAB3", "ddim", "ρ2Heun", "tAB1"])
    assert [r.label for r in rows] == ["ρ2Heun", "ρAB3", "DDIM", "tAB1"]  # each once
    peers = tables.TABLES["amed_cifar10"].select(["edm-heun", "dpm-solver++(3m)", "AMED-Solver"])
    assert [r.label for r in peers] == ["EDM (Heun)", "DPM-Solver++(3M)", "AMED-Solver"]
    with pytest.raises(ValueError) as info:
        spec.select(["rho2hen"])
    message = str(info.value)
    assert "row labels ('DDIM', 'ρ2Heun'," in message
    assert "or their ASCII names ('ddim', 'rho2heun', 'rho3kutta', 'rho4rk', 'rhoab1'," in message
    assert message.endswith("(any case), got ('rho2hen',)")
