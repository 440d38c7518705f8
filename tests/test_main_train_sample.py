"""End to end: ``main.py --mode=train`` then ``--mode=sample`` on tiny configs (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# A tiny DDPM++ (ncsnpp) so that compiling and running take seconds.
TINY = [
    "--config.model.nf=8",
    "--config.model.ch_mult=(1,)",
    "--config.model.num_res_blocks=1",
    "--config.model.attn_resolutions=()",
    "--config.data.image_size=8",
    "--config.training.batch_size=8",
    "--config.training.n_iters=4",
    "--config.training.log_every=2",
    "--config.training.checkpoint_every=2",
    "--config.sampling.num_samples=6",
    "--config.sampling.batch_size=4",
    "--config.sampler.nfe=4",
]

# Runs main.py under tfds.testing.mock_data: tfds datasets without files, TF or network.
MOCKED_MAIN = """
import runpy, sys
import tensorflow_datasets as tfds
sys.argv = ["main.py"] + sys.argv[1:]
with tfds.testing.mock_data(num_examples=16):
    runpy.run_path("main.py", run_name="__main__")
"""


def run_main(workdir, mode, config, extra=(), mocked=False):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    env.pop("XLA_FLAGS", None)
    head = [sys.executable, "-c", MOCKED_MAIN] if mocked else [sys.executable, "main.py"]
    args = [f"--config={config}", f"--workdir={workdir}", f"--mode={mode}", *TINY, *extra]
    out = subprocess.run(
        head + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stderr


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
    from deis_jax.experiments.generation import load_samples

    shards = load_samples(os.path.join(folder, "shards"))  # the verified, resumable copy
    np.testing.assert_array_equal(shards.samples, samples)


def test_train_then_sample_digits(tmp_path):
    workdir = str(tmp_path / "digits")
    log = run_main(workdir, "train", "configs/vpsde_digits.py")
    assert "steps/s" in log and "ETA" in log
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    run_main(workdir, "sample", "configs/vpsde_digits.py")
    check_samples(workdir, 6, 8, 1)


@pytest.mark.slow
def test_train_then_sample_cifar10_mocked(tmp_path):
    workdir = str(tmp_path / "cifar10")
    config = "configs/vpsde_cifar10.py"
    run_main(workdir, "train", config, mocked=True)
    run_main(workdir, "sample", config, mocked=True)
    check_samples(workdir, 6, 8, 3)


def test_sample_without_checkpoint_is_a_clear_error(tmp_path):
    from configs.vpsde_digits import get_config
    from deis_jax.modes import sample

    config = get_config()
    with pytest.raises(FileNotFoundError) as info:
        sample.load_sampling_params(config, str(tmp_path), model=None)
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
