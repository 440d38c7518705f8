"""Sampler benchmark: throughput, overhead over the bare network calls, compile time, memory.

    python scripts/benchmark.py                      # writes results/benchmark.{md,csv}
    python scripts/benchmark.py --batch 512 --dim 3072 --hidden 1024 --out results/gpu

For a fixed eps_fn (a two-layer MLP, cheap but not free) and batch it reports, per method:

* samples/s at ``--nfe``;
* overhead = time(sampler) / time(bare loop) - 1, where the bare loop is a ``lax.scan`` that
  calls the same eps_fn NFE times and does nothing else (target < 10%), and the same in
  milliseconds per NFE (the sampler's own arithmetic is a few memory-bound passes over the
  state, so it is a fixed cost per step: against a real U-Net it vanishes);
* compile time at NFE 10 and 100 (target: flat in NFE -- one scan body whatever the steps);
* the compiled program's memory (XLA ``memory_analysis``: arguments + outputs + temporaries)
  at NFE 10 and 100 (target: flat in NFE).

Timings are the best of ``--repeats`` alternating runs after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deis_jax as deis  # noqa: E402
from deis_jax.io_utils import atomic_write_text  # noqa: E402
from deis_jax.reporting import markdown_table, write_csv  # noqa: E402
from deis_jax.sampling.method_spec import parse_method_spec  # noqa: E402

METHODS = ("ddim", "tab3", "rhoab3", "ipndm3", "rhork:tableau=heun", "rhork:tableau=rk4",
           "dpmpp2", "unipc2", "sddim", "ersde3")  # fmt: skip


def make_eps_fn(dim: int, hidden: int, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    w1 = jax.random.normal(k1, (dim + 1, hidden)) / np.sqrt(dim)
    w2 = jax.random.normal(k2, (hidden, dim)) / np.sqrt(hidden)

    def eps_fn(x, t):
        h = jnp.concatenate([x, jnp.broadcast_to(t, x.shape[:1] + (1,)).astype(x.dtype)], 1)
        return jnp.tanh(h @ w1) @ w2

    return eps_fn


def paired_times(fn_a, args_a, fn_b, args_b, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` wall time of two functions, run alternately after a warm-up.

    Alternating and taking the minimum keeps interference from other processes out of the
    ratio of the two (the overhead measurement).
    """
    jax.block_until_ready(fn_a(*args_a))
    jax.block_until_ready(fn_b(*args_b))
    best_a = best_b = float("inf")
    for _ in range(repeats):
        for fn, args, which in ((fn_a, args_a, "a"), (fn_b, args_b, "b")):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            elapsed = time.perf_counter() - start
            if which == "a":
                best_a = min(best_a, elapsed)
            else:
                best_b = min(best_b, elapsed)
    return best_a, best_b


def compile_stats(fn, *args) -> tuple[float, int]:
    """Seconds to lower + compile, and bytes of the compiled program's buffers."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    total = 0
    if mem is not None:
        total = sum(
            getattr(mem, f, 0) or 0
            for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
        )
    return seconds, int(total)


def bare_loop(eps_fn, nfe: int):
    def loop(x):
        def body(x, t):
            return eps_fn(x, t), None

        return jax.lax.scan(body, x, jnp.linspace(1.0, 1e-3, nfe).astype(x.dtype))[0]

    return jax.jit(loop)


def benchmark(args) -> list[dict]:
    schedule = deis.VPSDE.linear()
    eps_fn = make_eps_fn(args.dim, args.hidden)
    x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.dim), jnp.float32)
    key = jax.random.PRNGKey(2)
    rows = []
    for text in args.methods:
        choice = parse_method_spec(text)

        def build(nfe, choice=choice):
            return deis.get_sampler(schedule, eps_fn, method=choice.method, order=choice.order,
                                    nfe=nfe, **choice.options)  # fmt: skip

        sampler = build(args.nfe)
        call_args = (x, key) if sampler.stochastic else (x,)
        seconds, bare = paired_times(
            jax.jit(sampler), call_args, bare_loop(eps_fn, sampler.nfe), (x,), args.repeats
        )
        c10, m10 = compile_stats(build(10), *call_args)
        c100, m100 = compile_stats(build(100), *call_args)
        row = {
            "method": choice.label,
            "nfe": sampler.nfe,
            "samples_per_s": args.batch / seconds,
            "overhead_pct": 100.0 * (seconds / bare - 1.0),
            "overhead_ms_per_nfe": 1e3 * (seconds - bare) / sampler.nfe,
            "eps_ms_per_nfe": 1e3 * bare / sampler.nfe,
            "compile_s_nfe10": c10,
            "compile_s_nfe100": c100,
            "memory_mib_nfe10": m10 / 2**20,
            "memory_mib_nfe100": m100 / 2**20,
        }
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()), flush=True)  # fmt: skip
        rows.append(row)
    return rows


def machine_description() -> str:
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (f"{dev.platform.upper()} {dev.device_kind}, {os.cpu_count()} cores ({cpu}); "
            f"jax {jax.__version__}, python {platform.python_version()}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--nfe", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", default="results/benchmark", help="path prefix for .md/.csv")
    args = parser.parse_args()
    rows = benchmark(args)
    fields = list(rows[0])
    write_csv(args.out + ".csv", rows, fields)
    header = (
        f"# Sampler benchmark\n\nMachine: {machine_description()}.\n\n"
        f"eps_fn: MLP {args.dim}→{args.hidden}→{args.dim} (tanh), batch {args.batch}, float32. "
        f"Command: `python scripts/benchmark.py {' '.join(sys.argv[1:])}`.\n"
        "Overhead: sampler time over a bare `lax.scan` of the same NFE eps_fn calls. "
        "Memory: XLA's compiled-program buffers (arguments + outputs + temporaries).\n\n"
    )
    table = markdown_table(fields, [[r[f] for f in fields] for r in rows])
    atomic_write_text(args.out + ".md", header + table)
    print(header + table)


if __name__ == "__main__":
    main()
