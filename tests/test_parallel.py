"""Data parallelism: the same samples on 1, 2 and 8 simulated CPU devices and on 2 processes.

Simulated devices need ``XLA_FLAGS`` before JAX starts, so each configuration runs in a
subprocess (this file with ``--worker``). Every worker generates the same 24 samples of a
16-D Gaussian mixture with ``deis_jax.experiments.generation`` (per-device batch 2) for a
deterministic (tAB3) and a stochastic (stochastic DDIM) method, with the exact
``GaussianMixture.eps_fn``.

Findings (see docs/scale.md, "Determinism"):

* With a fixed per-device batch, every run (1, 2 or 8 devices, 1 or 2 processes) is
  bit-identical, for both methods.
* This needs the eps_fn to be written as ``x * (1 / v)``: XLA's unpartitioned pipeline rewrites
  ``x / broadcast(v)`` into that form but the SPMD-partitioned one keeps the division, which
  made the 1-device run differ in the last bits; ``GaussianMixture.eps_fn`` multiplies.
* A different per-device batch *shape* can also change the last bits (XLA's CPU code for the
  batched contraction depends on the shape), which is why generation fixes the per-device
  batch. With ``sharded.shard_sampler`` the same 64 starting points are sampled in calls of
  8 rows per device (bit-identical on 1, 2 and 8 devices) and in one call of all 64 (8 rows
  per device on 8 devices: identical to the former; 32 or 64 rows per device on 2 or 1:
  only close, e.g. 787 of 1024 values differ by up to 1.1e-5 for tAB3).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from deis_jax.common.parallel import simulated_device_flags  # noqa: E402

NUM_SAMPLES = 24
SHARD = 5
PER_DEVICE = 2
METHODS = (("tab", 3), ("sddim", 0))
# shard_sampler (tAB3): 64 16-D starting points in calls of 8 rows per device, or in one call
SHARDED_METHOD, SHARDED_ROWS, SHARDED_PER_DEVICE = "tab3", 64, 8
COND = "tab3_conditional"  # tAB3 with per-sample classes (ClassLabels) bound to the eps


# --- the worker (runs in a subprocess) ----------------------------------------------------


def _mixture():
    from deis_jax.evaluation.analytic import GaussianMixture

    rng = np.random.default_rng(0)
    return GaussianMixture(rng.normal(size=(4, 16)), rng.uniform(0.2, 0.5, 4), np.ones(4))


def worker(out_dir: str) -> None:
    from deis_jax.common import parallel
    from deis_jax.experiments import generation
    from deis_jax.sampling.sampler import get_sampler
    from deis_jax.sampling.sde import VPSDE

    parallel.maybe_initialize_distributed()  # JAX_* env variables in the 2-process test
    import jax

    schedule = VPSDE.linear()
    mixture = _mixture()
    eps_fn = mixture.eps_fn(schedule)
    report = {"devices": jax.device_count(), "processes": jax.process_count(), "written": {}}
    for method, order in METHODS:
        sampler = get_sampler(schedule, eps_fn, method=method, order=order, nfe=6)
        name = f"{method}{order}"
        result = generation.generate_samples(
            os.path.join(out_dir, name), sampler, num_samples=NUM_SAMPLES,
            sample_shape=(16,), seed=7, shard_size=SHARD, per_device_batch=PER_DEVICE,
            progress=False, metadata={"test": name},
        )  # fmt: skip
        report["written"][name] = list(result.written)
        if jax.process_count() == 1 and name == SHARDED_METHOD:
            np.savez(os.path.join(out_dir, "shard_sampler.npz"), **sharded_calls(sampler))
            conditional_run(os.path.join(out_dir, COND), sampler, eps_fn)
    print("REPORT " + json.dumps(report), flush=True)


def conditional_run(out_dir: str, sampler, eps_fn) -> None:
    """A class-conditional generation: a toy eps whose input is shifted by the class, the
    classes drawn per sample index (``ClassLabels``) inside the jit."""
    from deis_jax.experiments import generation
    from deis_jax.sampling.class_labels import ClassLabels

    def bind(params):  # a conditional eps takes the rows' classes with each call
        return lambda x, t, labels: eps_fn(x + 0.1 * labels[:, None].astype(x.dtype), t)

    generation.generate_samples(
        out_dir, sampler, num_samples=NUM_SAMPLES, sample_shape=(16,), seed=7,
        shard_size=SHARD, per_device_batch=PER_DEVICE, bind=bind,
        labels=ClassLabels(4, "random", seed=7), progress=False, metadata={"test": COND},
    )  # fmt: skip


def sharded_calls(sampler) -> dict[str, np.ndarray]:
    """The same starting points through ``sharded.shard_sampler``: ``fixed`` in calls of
    ``SHARDED_PER_DEVICE`` rows per device, ``global`` in one call of all rows."""
    import jax

    from deis_jax.common import parallel
    from deis_jax.sampling import sharded

    mesh = parallel.make_mesh()
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (SHARDED_ROWS, 16), np.float32))
    fn, key = sharded.shard_sampler(sampler, mesh), jax.random.PRNGKey(5)
    step = SHARDED_PER_DEVICE * mesh.size

    def run(start, stop):
        return parallel.gather(fn(parallel.shard_batch(x_T[start:stop], mesh), key, start))

    fixed = [run(i, i + step) for i in range(0, SHARDED_ROWS, step)]
    return {"fixed": np.concatenate(fixed), "global": run(0, SHARDED_ROWS)}


# --- the tests ----------------------------------------------------------------------------


def _env(devices: int, extra: dict | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = simulated_device_flags(os.environ.get("XLA_FLAGS"), devices)
    for k in ("JAX_ENABLE_X64", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    env.update(extra or {})
    return env


def _report(stdout: str) -> dict:
    line = next(x for x in stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT ") :])


def _load(directory: str) -> dict[str, np.ndarray]:
    from deis_jax.experiments.generation import load_samples

    return {f"{m}{o}": load_samples(os.path.join(directory, f"{m}{o}")).samples for m, o in METHODS}


@pytest.fixture(scope="module")
def device_dirs(tmp_path_factory):
    """The output folders of the worker on 1, 2 and 8 simulated devices (one subprocess
    each)."""
    dirs = {}
    for n in (1, 2, 8):
        out = tmp_path_factory.mktemp(f"dev{n}")
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(out)], cwd=ROOT, env=_env(n),
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert _report(proc.stdout)["devices"] == n
        dirs[n] = str(out)
    return dirs


@pytest.fixture(scope="module")
def device_runs(device_dirs):
    """Samples generated with 1, 2 and 8 simulated devices."""
    return {n: _load(out) for n, out in device_dirs.items()}


@pytest.fixture(scope="module")
def shard_sampler_runs(device_dirs):
    """``{devices: {'fixed', 'global'}}`` of :func:`sharded_calls`."""
    return {
        n: dict(np.load(os.path.join(out, "shard_sampler.npz"))) for n, out in device_dirs.items()
    }


def test_class_labels_are_keyed_per_sample_across_device_counts(device_dirs):
    """Conditional generation: the classes follow the sample index, so 1, 2 and 8 devices
    give the same samples bit for bit; the classes change the samples."""
    from deis_jax.experiments.generation import load_samples

    runs = {n: load_samples(os.path.join(d, COND)).samples for n, d in device_dirs.items()}
    np.testing.assert_array_equal(runs[1], runs[2])
    np.testing.assert_array_equal(runs[1], runs[8])
    plain = _load(device_dirs[1])["tab3"]
    assert np.abs(runs[1] - plain).max() > 1e-3


def test_partitioned_runs_are_bit_identical(device_runs):
    for name, x in device_runs[2].items():
        assert x.shape == (NUM_SAMPLES, 16)
        np.testing.assert_array_equal(device_runs[8][name], x, err_msg=name)


def test_one_device_is_bit_identical(device_runs):
    for name, x in device_runs[1].items():
        np.testing.assert_array_equal(x, device_runs[2][name], err_msg=name)
        np.testing.assert_array_equal(x, device_runs[8][name], err_msg=name)


def test_shard_sampler_fixed_per_device_batch_is_bit_identical(shard_sampler_runs):
    """The union of the sharded results is the 1-device result bit for bit when every call
    has the same per-device batch -- whatever the device count."""
    runs = shard_sampler_runs
    for n in (2, 8):
        np.testing.assert_array_equal(runs[n]["fixed"], runs[1]["fixed"])
    # the whole batch in one call on 8 devices is 8 rows per device too: the same bits
    np.testing.assert_array_equal(runs[8]["global"], runs[1]["fixed"])


def test_shard_sampler_same_global_batch_split_differently_is_only_close(shard_sampler_runs):
    """The same global batch over 1, 2 or 8 devices (64, 32, 8 rows per device) is not
    guaranteed bit-identical (another shape, another XLA program); it agrees to float32
    rounding grown through the solve."""
    runs = shard_sampler_runs
    for n in (2, 8):
        np.testing.assert_allclose(runs[n]["global"], runs[1]["global"], rtol=0, atol=2e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_match_single_process(device_runs, tmp_path):
    port = _free_port()
    procs = []
    for pid in range(2):
        extra = {
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(tmp_path)],
                cwd=ROOT,
                env=_env(2, extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    reports = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, stderr[-4000:]
        reports.append(_report(stdout))
    assert [r["processes"] for r in reports] == [2, 2]
    assert [r["devices"] for r in reports] == [4, 4]
    # 5 shards split into contiguous blocks: process 0 writes 0-2, process 1 writes 3-4.
    for name in reports[0]["written"]:
        assert reports[0]["written"][name] == [0, 1, 2]
        assert reports[1]["written"][name] == [3, 4]
    together = _load(str(tmp_path))  # manifest written by process 0, verified here
    for name, x in together.items():
        np.testing.assert_array_equal(x, device_runs[2][name], err_msg=name)
        np.testing.assert_array_equal(x, device_runs[1][name], err_msg=name)


def test_simulated_device_flags_keep_the_other_xla_flags():
    """A child simulating N devices runs under its parent's floating-point flags (the numerics
    pass's ``--xla_cpu_max_isa``), with exactly one device-count flag."""
    numerics = "--xla_cpu_max_isa=AVX --xla_force_host_platform_device_count=2"
    assert simulated_device_flags(numerics, 8) == (
        "--xla_cpu_max_isa=AVX --xla_force_host_platform_device_count=8"
    )
    assert simulated_device_flags(numerics, None) == "--xla_cpu_max_isa=AVX"
    assert simulated_device_flags(None, 1) == "--xla_force_host_platform_device_count=1"


def test_process_range_partitions_indices():
    from deis_jax.common.parallel import process_range

    for num in (0, 1, 7, 24, 50_000):
        for count in (1, 2, 3, 8):
            parts = [process_range(num, p, count) for p in range(count)]
            flat = [i for r in parts for i in r]
            assert flat == list(range(num))
            assert max(len(r) for r in parts) - min(len(r) for r in parts) <= 1
    with pytest.raises(ValueError):
        process_range(10, 2, 2)


def test_distributed_plan_from_environment():
    from deis_jax.common.parallel import distributed_plan

    assert not distributed_plan(environ={}).initialize
    slurm = {
        "SLURM_JOB_ID": "12", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
    }  # fmt: skip
    assert not distributed_plan(environ={**slurm, "SLURM_NTASKS": "1"}).initialize
    plan = distributed_plan(environ={**slurm, "SLURM_NTASKS": "4"})
    assert plan.initialize and plan.kwargs == {}
    explicit = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
    }  # fmt: skip
    plan = distributed_plan(environ=explicit)
    assert plan.initialize
    assert plan.kwargs == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
    }  # fmt: skip
    assert not distributed_plan(environ={**explicit, "DEIS_DISTRIBUTED": "0"}).initialize
    assert not distributed_plan(num_processes=1, environ={}).initialize
    with pytest.raises(ValueError, match="process_id"):
        distributed_plan(coordinator_address="h:1", num_processes=2, environ={})
    plan = distributed_plan(environ={"DEIS_DISTRIBUTED": "1"})
    assert plan.initialize and plan.kwargs == {}
    gke = {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}
    assert distributed_plan(environ=gke).initialize
    assert not distributed_plan(environ={"TPU_WORKER_HOSTNAMES": "w-0"}).initialize


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    worker(sys.argv[2])
