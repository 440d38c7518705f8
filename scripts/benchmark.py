"""Sampler benchmark: throughput, overhead over the bare network calls, compile time, memory.

    python scripts/benchmark.py                      # writes results/benchmark.{md,csv}
    python scripts/benchmark.py --batch 512 --dim 3072 --hidden 1024 --out results/gpu

Two noise predictions, each at every ``--nfe`` (default 10 and 50):

* ``mlp``: a two-layer MLP in float32, cheap but not free (a stand-in for a network);
* ``mixture``: the exact eps of a Gaussian mixture in float64 -- a few passes over the
  state, so the sampler's own arithmetic is a large fraction of the time and any extra copy
  in the loop shows.

Per method it reports samples/s, ``ratio`` = time(sampler) / time(bare loop), where the bare
loop is a ``lax.scan`` that calls the same eps_fn NFE times and does nothing else, and the
overhead in milliseconds per NFE. Targets (``target_ratio``, multistep methods): <= 1.05
with the MLP and <= 1.15 with the mixture. Compile time and the compiled program's memory
(XLA ``memory_analysis``: arguments + outputs + temporaries) are measured at NFE 10 and 100
(target: flat in NFE -- one scan body whatever the steps).

Timings are the best of ``--repeats`` alternating runs after a warm-up.

``--epd-step`` instead times one EPD step with K = 2 probes (``epd``, neutral tables as rule
params: the device-side rule included) against one iPNDM-3 step, over ``--epd-steps`` steps
with the networks of ``scripts/benchmark_amed.py`` (``mlp``: the MLP above, float32;
``ddpmpp``: the digits DDPM++, random weights) and writes ``<out>_epd.{md,csv}``. An EPD step
is one call on the batch and one on the 2 B probes; its ratio to a bare loop of the same
3 calls per step (``epd_over_bare``, target <= 1.1) is what batching the probes costs or
saves: about 1 on a CPU (a 2 B call costs two B calls), below 1 where the accelerator has
idle width.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deis_jax as deis  # noqa: E402
from deis_jax.common.reporting import write_results  # noqa: E402
from deis_jax.sampling.method_spec import parse_method_spec  # noqa: E402

METHODS = ("ddim", "tab3", "rhoab3", "ipndm3", "rhork:tableau=heun", "rhork:tableau=rk4",
           "dpmpp2", "unipc2", "sddim", "ersde3")  # fmt: skip


EPS_KINDS = ("mlp", "mixture")
TARGET_RATIO = {"mlp": 1.05, "mixture": 1.15}  # deterministic multistep methods


def make_eps_fn(dim: int, hidden: int, seed: int = 0):
    """A two-layer tanh MLP ``[x, t] -> eps`` with float32 weights."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    w1 = jax.random.normal(k1, (dim + 1, hidden), jnp.float32) / float(np.sqrt(dim))
    w2 = jax.random.normal(k2, (hidden, dim), jnp.float32) / float(np.sqrt(hidden))

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


def eps_and_state(kind: str, schedule, args):
    """``(eps_fn, x)`` of an eps kind: the float32 MLP or the float64 exact mixture."""
    if kind == "mlp":
        x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.dim), jnp.float32)
        return make_eps_fn(args.dim, args.hidden), x
    mixture = deis.GaussianMixture.embedded(args.dim)
    x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.dim), jnp.float64)
    return mixture.eps_fn(schedule), x


def benchmark(args) -> list[dict]:
    schedule = deis.VPSDE.linear()
    key = jax.random.PRNGKey(2)
    rows = []
    for kind in args.eps:
        eps_fn, x = eps_and_state(kind, schedule, args)
        for text in args.methods:
            choice = parse_method_spec(text)

            def build(nfe, choice=choice, eps_fn=eps_fn):
                # Runge-Kutta rounds up to whole steps, as the papers' tables (the row's nfe)
                return deis.get_sampler(schedule, eps_fn, method=choice.method,
                                        order=choice.order, nfe=nfe, nfe_rounding="up",
                                        **choice.options)  # fmt: skip

            probe = build(10)
            call_args = (x, key) if probe.stochastic else (x,)
            c10, m10 = compile_stats(probe, *call_args)
            c100, m100 = compile_stats(build(100), *call_args)
            for nfe in args.nfe:
                sampler = build(nfe)
                seconds, bare = paired_times(jax.jit(sampler), call_args,
                                             bare_loop(eps_fn, sampler.nfe), (x,),
                                             args.repeats)  # fmt: skip
                multistep = sampler.table.history and not sampler.stochastic
                target = TARGET_RATIO[kind] if multistep else None
                row = {
                    "eps": f"{kind} {x.dtype}",
                    "method": choice.label,
                    "nfe": sampler.nfe,
                    "samples_per_s": args.batch / seconds,
                    "ratio": seconds / bare,
                    "target_ratio": "" if target is None else target,
                    "meets_target": "" if target is None else seconds / bare <= target,
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


def _benchmark_amed():
    """``scripts/benchmark_amed.py`` as a module (its networks and timing helpers)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_amed.py")
    spec = importlib.util.spec_from_file_location("benchmark_amed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def epd_step_rows(args) -> list[dict]:
    """``--epd-step`` (module docstring): per network, medians of interleaved runs of EPD
    (K = 2), iPNDM-3 and the bare loops of their network calls, on the same number of steps."""
    amed = _benchmark_amed()
    rows = []
    for name in args.epd_networks:
        net_args = argparse.Namespace(batch=args.batch, dim=args.dim, hidden=args.hidden,
                                      init="normal")  # fmt: skip
        schedule, eps_fn, x, description = amed.network(name, net_args)
        eps_fn = deis.per_sample_time(eps_fn) if name == "mlp" else eps_fn  # takes t (B,)
        steps = args.epd_steps
        epd = deis.make_plan(schedule, method="epd", nfe=3 * steps, probes=2)
        ipndm = deis.make_plan(schedule, method="ipndm", order=3, nfe=steps)
        params = epd.rule.init_params()
        calls = [
            (amed.rule_sampler(epd, eps_fn), (x, params)),
            (amed.base_sampler(ipndm, eps_fn), (x,)),
            (bare_loop(eps_fn, epd.nfe), (x,)),
            (bare_loop(eps_fn, ipndm.nfe), (x,)),
        ]
        epd_s, ipndm_s, bare_epd_s, bare_ipndm_s = amed.interleaved_medians(calls, args.repeats)
        row = {
            "network": description,
            "batch": args.batch,
            "steps": steps,
            "epd_nfe": epd.nfe,
            "epd_parallel_nfe": epd.parallel_nfe,
            "epd_ms_per_step": 1e3 * epd_s / steps,
            "ipndm_ms_per_step": 1e3 * ipndm_s / steps,
            "epd_step_over_ipndm_step": epd_s / ipndm_s,
            "epd_over_bare": epd_s / bare_epd_s,
            "ipndm_over_bare": ipndm_s / bare_ipndm_s,
            "meets_target": epd_s / bare_epd_s <= 1.1,
        }  # fmt: skip
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eps", nargs="+", default=list(EPS_KINDS), choices=EPS_KINDS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", default="results/benchmark", help="path prefix for .md/.csv")
    parser.add_argument(
        "--epd-step",
        action="store_true",
        help="time one EPD step (K = 2) against one iPNDM step instead",
    )
    parser.add_argument(
        "--epd-networks", nargs="+", default=["mlp", "ddpmpp"], choices=["mlp", "ddpmpp"]
    )
    parser.add_argument("--epd-steps", type=int, default=4)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.epd_step:
        rows = epd_step_rows(args)
        header = (
            f"# One EPD step (K = 2) against one iPNDM-3 step\n\nMachine: "
            f"{machine_description()}.\n\nfloat32, batch {args.batch}, {args.epd_steps} steps; "
            f"medians of {args.repeats} interleaved runs. Command: `python scripts/benchmark.py "
            f"{' '.join(argv)}`.\n`epd_over_bare`: EPD over a bare `lax.scan` of its "
            "3 network calls per step (target <= 1.1); `ipndm_over_bare` likewise with 1.\n\n"
        )  # fmt: skip
        print(write_results(f"{args.out}_epd", rows, header))
        return
    jax.config.update("jax_enable_x64", True)  # the mixture rows; the MLP stays float32
    rows = benchmark(args)
    header = (
        f"# Sampler benchmark\n\nMachine: {machine_description()}.\n\n"
        f"eps_fn: `mlp` = MLP {args.dim}→{args.hidden}→{args.dim} (tanh), float32; "
        f"`mixture` = exact eps of an 8-component Gaussian mixture in R^{args.dim}, float64. "
        f"Batch {args.batch}. "
        f"Command: `python scripts/benchmark.py {' '.join(argv)}`.\n"
        "Ratio: sampler time over a bare `lax.scan` of the same NFE eps_fn calls (target for "
        "multistep methods: <= 1.05 with the MLP, <= 1.15 with the mixture). "
        "Memory: XLA's compiled-program buffers (arguments + outputs + temporaries).\n\n"
    )
    print(write_results(args.out, rows, header))


if __name__ == "__main__":
    main()
