"""End to end: ``main.py --mode=train`` then ``--mode=sample`` on tiny configs, in-process
(``deis_jax.experiments.modes.run_mode``, what ``main.py`` calls), and ``main.py``'s start-up
check."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs import vpsde_cifar10, vpsde_digits  # noqa: E402
from deis_jax.experiments.generation import load_samples  # noqa: E402
from deis_jax.experiments.modes import run_mode  # noqa: E402
from deis_jax.models.loading import load_sampling_params  # noqa: E402


def tiny(config):
    """A tiny DDPM++ (ncsnpp) so that compiling and running take seconds."""
    config.model.nf = 8
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.data.image_size = 8
    config.training.batch_size = 8
    config.training.n_iters = 4
    config.training.log_every = 2
    config.training.checkpoint_every = 2
    config.sampling.num_samples = 6
    config.sampling.batch_size = 4
    config.sampler.nfe = 4
    return config


@pytest.fixture(autouse=True)
def as_main_runs():
    """As ``main.py`` runs (no x64, which the test session enables), with most XLA
    optimisations skipped: these tests are about wiring, not speed."""
    previous = {
        k: jax.config.values[k] for k in ("jax_enable_x64", "jax_disable_most_optimizations")
    }
    jax.config.update("jax_enable_x64", False)
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    for key, value in previous.items():
        jax.config.update(key, value)


def run_main(workdir, mode, config, caplog, mocked=False):
    """``main.py --mode=<mode>`` in this process (``deis_jax.experiments.modes.run_mode``); returns
    the log. ``mocked``: under ``tfds.testing.mock_data`` (tfds datasets without files, TF or
    network)."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        if mocked:
            import tensorflow_datasets as tfds

            with tfds.testing.mock_data(num_examples=16):
                run_mode(mode, config, workdir)
        else:
            run_mode(mode, config, workdir)
    return caplog.text


def check_samples(workdir, num, size, channels, tag="tab3_nfe4_quadratic"):
    folder = os.path.join(workdir, "samples", tag)
    with np.load(os.path.join(folder, "samples.npz")) as f:
        samples = f["samples"]
        assert int(f["nfe"]) == 4
    assert samples.shape == (num, size, size, channels) and samples.dtype == np.uint8
    assert samples.std() > 0
    png = os.path.join(folder, "samples.png")
    assert os.path.getsize(png) > 0
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    shards = load_samples(os.path.join(folder, "shards"))  # the verified, resumable copy
    np.testing.assert_array_equal(shards.samples, samples)


def test_train_then_sample_digits(tmp_path, caplog):
    workdir = str(tmp_path / "digits")
    config = tiny(vpsde_digits.get_config())
    log = run_main(workdir, "train", config, caplog)
    assert "steps/s" in log and "ETA" in log
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    run_main(workdir, "sample", config, caplog)
    check_samples(workdir, 6, 8, 1)


@pytest.mark.slow
def test_train_then_sample_cifar10_mocked(tmp_path, caplog):
    workdir = str(tmp_path / "cifar10")
    config = tiny(vpsde_cifar10.get_config())
    run_main(workdir, "train", config, caplog, mocked=True)
    run_main(workdir, "sample", config, caplog, mocked=True)
    check_samples(workdir, 6, 8, 3)


def test_sample_without_checkpoint_is_a_clear_error(tmp_path):
    config = vpsde_digits.get_config()
    with pytest.raises(FileNotFoundError) as info:
        load_sampling_params(config, str(tmp_path))
    message = str(info.value)
    assert "--mode=train" in message and "config.sampling.checkpoint" in message
    assert os.path.join(str(tmp_path), "checkpoints") in message


def test_bad_config_value_is_rejected_at_start_up(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--config=configs/vpsde_digits.py",
            f"--workdir={tmp_path}",
            "--mode=train",
            "--config.data.name=mnist",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode != 0
    assert "config.data.name must be one of" in out.stderr and "'digits'" in out.stderr
