"""Sampling throughput vs device count (data parallel over a ``('data',)`` mesh).

    python scripts/benchmark_scaling.py                      # CPU: simulated 1, 2, 4, 8 devices
    python scripts/benchmark_scaling.py --devices=1,2,4,8 --dim=3072 --per_device_batch=64
    python scripts/benchmark_scaling.py --real               # the real devices (GPU/TPU host)

Each configuration runs in its own subprocess (simulated CPU devices need
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts); one more row runs 2
``jax.distributed`` processes on localhost with 2 devices each. The workload is the embedded
job's: the exact eps of a Gaussian mixture, tAB3 at NFE 10, ``x_T`` drawn inside the jit from
the global sample indices (``deis_jax.sampling.sharded.make_generate_fn``), weak scaling (a fixed
per-device batch). Prints a Markdown table and writes it to ``results/benchmark_scaling.md``.

Simulated CPU devices share the same cores, so on CPU this measures the overhead of sharding
and whether results are unchanged, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from deis_jax.common.parallel import simulated_device_flags  # noqa: E402


def child(args) -> None:
    from deis_jax.common import parallel
    from deis_jax.sampling import sharded

    parallel.maybe_initialize_distributed()
    import jax
    import numpy as np

    from deis_jax.evaluation.analytic import GaussianMixture
    from deis_jax.sampling.sampler import get_sampler
    from deis_jax.sampling.sde import VPSDE

    schedule = VPSDE.linear()
    rng = np.random.default_rng(0)
    mixture = GaussianMixture(
        rng.normal(size=(8, args.dim)), rng.uniform(0.2, 0.5, 8), rng.uniform(0.5, 1.5, 8)
    )
    sampler = get_sampler(schedule, mixture.eps_fn(schedule), method="tab", order=3, nfe=args.nfe)
    mesh = parallel.make_mesh()
    fn = sharded.make_generate_fn(sampler, mesh, (args.dim,))
    prior_key, noise_key = parallel.replicate(sharded.sample_keys(0), mesh)
    local = args.per_device_batch * jax.local_device_count()
    start_index = jax.process_index() * local

    def indices(call):
        offset = call * args.per_device_batch * mesh.size
        return parallel.shard_local_batch(
            np.arange(offset + start_index, offset + start_index + local, dtype=np.int32), mesh
        )

    t0 = time.perf_counter()
    first, _ = fn(None, prior_key, noise_key, indices(0))
    jax.block_until_ready(first)
    compile_s = time.perf_counter() - t0
    windows = []  # best of 3 timing windows: the machine may be shared
    for window in range(3):
        t0 = time.perf_counter()
        for call in range(1, args.repeats + 1):
            out, _ = fn(None, prior_key, noise_key, indices(window * args.repeats + call))
        jax.block_until_ready(out)
        windows.append(time.perf_counter() - t0)
    seconds = min(windows)
    rows = parallel.local_rows(first)[: args.per_device_batch]  # global samples 0..b-1
    samples = args.repeats * args.per_device_batch * mesh.size
    result = {
        "processes": jax.process_count(),
        "devices": mesh.size,
        "platform": jax.devices()[0].platform,
        "global_batch": args.per_device_batch * mesh.size,
        "compile_s": compile_s,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "first": rows.tolist() if jax.process_index() == 0 else None,
    }
    print("RESULT " + json.dumps(result), flush=True)  # every process: its own wall time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, devices: int | None, processes: int = 1) -> dict:
    env = dict(os.environ)
    if devices is not None:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = simulated_device_flags(os.environ.get("XLA_FLAGS"), devices)
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", f"--dim={args.dim}",
        f"--nfe={args.nfe}", f"--per_device_batch={args.per_device_batch}",
        f"--repeats={args.repeats}",
    ]  # fmt: skip
    port = _free_port()
    procs = []
    for pid in range(processes):
        penv = dict(env)
        if processes > 1:
            penv.update(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=str(processes),
                JAX_PROCESS_ID=str(pid),
            )
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=1800) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"benchmark child failed:\n{err[-3000:]}")
    results = []
    for out, _ in outputs:
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT ") :]))
    # The processes work independently: global throughput is set by the slowest one.
    result = results[0]
    result["seconds"] = max(r["seconds"] for r in results)
    result["compile_s"] = max(r["compile_s"] for r in results)
    result["samples_per_s"] = args.repeats * result["global_batch"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2,4,8", help="simulated CPU device counts")
    parser.add_argument("--real", action="store_true", help="use the real devices instead")
    parser.add_argument("--no_multiprocess", action="store_true", help="skip the 2-process row")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--per_device_batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "benchmark_scaling.md"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import numpy as np

    runs = []
    if args.real:
        runs.append(("all local devices", _run(args, None)))
    else:
        for n in (int(x) for x in args.devices.split(",")):
            runs.append((f"{n}", _run(args, n)))
            print(f"{n} device(s): {runs[-1][1]['samples_per_s']:.0f} samples/s", flush=True)
        if not args.no_multiprocess:
            runs.append(("2 processes x 2", _run(args, 2, processes=2)))
            print(f"2x2: {runs[-1][1]['samples_per_s']:.0f} samples/s", flush=True)
    base = runs[0][1]
    ref = np.asarray(base["first"])
    lines = [
        "# Sampling throughput vs device count",
        "",
        f"tAB3, NFE {args.nfe}, exact eps of an 8-component Gaussian mixture in {args.dim} "
        f"dimensions, {args.per_device_batch} samples per device per call (weak scaling), "
        f"best of 3 windows of {args.repeats} calls after one compile call; `deis_jax.sampling."
        f"sharded.make_generate_fn` on a `('data',)` mesh. Host: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, platform `{base['platform']}`.",
        "",
        "| devices | processes | global batch | compile + 1st call (s) | samples/s | "
        "per device (samples/s) | speed-up vs 1st row | samples 0..b-1 vs 1st row | "
        "vs 2nd row |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    second = np.asarray(runs[1][1]["first"]) if len(runs) > 1 else ref

    def same(a, b):
        diff = float(np.max(np.abs(np.asarray(a) - b)))
        return "bit-identical" if diff == 0 else f"max abs diff {diff:.1e}"

    for label, r in runs:
        lines.append(
            f"| {label} | {r['processes']} | {r['global_batch']} | {r['compile_s']:.2f} | "
            f"{r['samples_per_s']:.0f} | {r['samples_per_s'] / r['devices']:.0f} | "
            f"{r['samples_per_s'] / base['samples_per_s']:.2f} | {same(r['first'], ref)} | "
            f"{same(r['first'], second)} |"
        )
    if not args.real:
        lines += [
            "",
            "**Simulated CPU devices share the same "
            f"{os.cpu_count()} cores**: this table measures the overhead of sharding and checks "
            "that the samples do not change; it is not a speed-up measurement (each simulated "
            "device gets a share of the same cores, and the machine may be shared, so timings "
            "are noisy). On GPUs/TPUs run `python scripts/benchmark_scaling.py --real` on hosts "
            "with 1, 2, 4, 8 accelerators.",
            "",
            "Sample columns compare the first batch of each run with the 1-device and 2-device "
            "runs: per-sample keys by global index and a fixed per-device batch make them "
            "bit-identical (docs/scale.md, Determinism).",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    from deis_jax.common.files import atomic_write_text

    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
