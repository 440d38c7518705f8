"""One accelerator check (issue 23): sampler overhead and images/s of full-size networks in
float32 and bfloat16, written to ``results/device_check.md`` with the device's name.

    python scripts/device_check.py                 # on a GPU/TPU: full size, batch 256
    python scripts/device_check.py --tiny --out /tmp/device_check.md   # CPU wiring check

Networks, with random weights (timings do not depend on their values): score_sde's
DDPM++ deep (CIFAR-10 VP, ``vp_cifar10_ddpmpp_deep_continuous``) and EDM's SongUNet
(``edm-cifar10-32x32-uncond-vp``), each with ``config.model.dtype`` float32 and bfloat16
(``deis_jax.common.precision``). Per network, dtype and method (DDIM, tAB-3, iPNDM-3,
DPM-Solver++(2M), AMED-Plugin on iPNDM with its untrained stepwise predictor) at NFE 10:

* ``ratio`` = time(sampler) / time(bare ``lax.scan`` of the same NFE network calls)
  (``scripts/benchmark.py``'s measure; target <= 1.02 with these networks);
* ``images/s`` of the sampler; ``peak MiB``: the device's peak memory after the row (where
  the backend reports it).

With two or more devices it also checks that a batch sharded over two devices gives the
samples of one device (``deis_jax.sampling.sharded`` is not used: the check is jit with a
batch sharding). ``--tiny`` shrinks networks and batch so that the script runs on a CPU in
seconds (what tests/test_device_check.py runs).

A second table: the memory of one LD3 fit step and one AMED training step (gradients through
NFE 10 float32 network calls at ``--fit-batch``, every call under ``jax.checkpoint`` unless
``--no-remat``): the compiled program's buffers (XLA's ``memory_analysis``) and the device's
peak after running it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark import machine_description, paired_times  # noqa: E402

from configs import default as default_configs  # noqa: E402
from configs import edm_cifar10_vp  # noqa: E402
from deis_jax.common import parallel  # noqa: E402
from deis_jax.common.progress import progress_bar  # noqa: E402
from deis_jax.experiments.build import schedule_from_config  # noqa: E402
from deis_jax.fitting import amed, ld3  # noqa: E402
from deis_jax.fitting.amed import init_params as init_amed_params  # noqa: E402
from deis_jax.models import family_of  # noqa: E402
from deis_jax.sampling.rule_params import RuleParams  # noqa: E402
from deis_jax.sampling.sampler import make_plan, sample  # noqa: E402
from deis_jax.sampling.wrappers import eps_fn_from_model, model_argument  # noqa: E402

TARGET_RATIO = 1.02
DTYPES = ("float32", "bfloat16")
# (label, make_plan arguments)
METHODS = (
    ("DDIM", dict(method="ddim")),
    ("tAB-3", dict(method="tab", order=3)),
    ("iPNDM-3", dict(method="ipndm", order=3)),
    ("DPM-Solver++(2M)", dict(method="dpmpp", order=2)),
    ("AMED-Plugin", dict(method="amed_ipndm", afs=True, predictor="stepwise")),
)
TINY_SCORE_SDE = dict(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,))
TINY_EDM = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[4])
TINY_SIZE = 4


def network_configs(tiny: bool) -> dict:
    """``{name: experiment config}`` of the two networks (small with ``tiny``)."""
    ddpmpp = default_configs.get_default_config()
    ddpmpp.model = default_configs.model_block(
        "vp_cifar10_ddpmpp_deep_continuous", **(TINY_SCORE_SDE if tiny else {})
    )
    kwargs = dict(edm_cifar10_vp.CIFAR10_UNCOND_VP, **(TINY_EDM if tiny else {}))
    if tiny:
        kwargs["img_resolution"] = TINY_SIZE
    song = edm_cifar10_vp.get_config()
    song.model = edm_cifar10_vp.edm_block("VPPrecond", kwargs)
    for config in (ddpmpp, song):
        config.data.image_size = TINY_SIZE if tiny else 32
    return {"DDPM++ deep (score_sde)": ddpmpp, "SongUNet (EDM VP)": song}


# --networks keys -> the names of network_configs
NETWORKS = {"ddpmpp": "DDPM++ deep (score_sde)", "songunet": "SongUNet (EDM VP)"}


def random_params(config, net, seed: int = 0):
    """Random float32 weights in the shapes of ``config``'s network, N(0, 0.05^2) (timings do
    not depend on the values; drawn on the host, nothing to compile)."""
    rng = np.random.default_rng(seed)
    abstract = family_of(config).abstract_params(config, net)
    return jax.tree.map(
        lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape, np.float32)), abstract
    )


def bare_loop(eps_fn, nfe: int):
    """``nfe`` network calls in a ``lax.scan`` and nothing else (the output cast to the
    state's dtype, as the sampler casts it)."""

    def loop(x):
        def body(x, t):
            return eps_fn(x, t).astype(x.dtype), None

        return jax.lax.scan(body, x, jnp.linspace(1.0, 1e-3, nfe).astype(x.dtype))[0]

    return jax.jit(loop)


def peak_mib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def network(config):
    """``(eps_fn, parameter count, image shape)`` of ``config``'s network with random weights
    in ``config.model.dtype``."""
    family = family_of(config)
    net = family.build(config)
    params = random_params(config, net)
    schedule = schedule_from_config(config.sde)
    eps_fn = eps_fn_from_model(
        family.model_fn(config, net, params, None), schedule, family.prediction(config)
    )
    size = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    res, ch = config.data.image_size, config.data.num_channels
    return eps_fn, size, (res, res, ch)


def rows_of(
    name: str, config, dtype: str, batch: int, nfe: int, repeats: int, methods: list[str]
) -> list[dict]:
    """One row per method (of ``methods``, labels of :data:`METHODS`) for the network of
    ``config`` in ``dtype``."""
    config.model.dtype = dtype
    eps_fn, size, image = network(config)
    schedule = schedule_from_config(config.sde)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, *image), jnp.float32)
    run = jax.jit(sample, static_argnums=0)
    model = model_argument(eps_fn)
    bare_loops = {}  # one compiled bare loop per NFE
    rows = []
    for label, options in METHODS:
        if label not in methods:
            continue
        plan = make_plan(schedule, nfe=nfe, nfe_rounding="up", **options)
        rule = None
        if plan.rule is not None:
            rule = RuleParams.for_plan(plan, init_amed_params(plan, eps_fn, x))

        def sampler(x, plan=plan, rule=rule):
            return run(plan, model, x, rule_params=rule)

        bare = bare_loops.setdefault(plan.nfe, bare_loop(eps_fn, plan.nfe))
        seconds, bare_seconds = paired_times(sampler, (x,), bare, (x,), repeats)
        ratio = seconds / bare_seconds
        rows.append(
            {
                "network": name,
                "params_M": size / 1e6,
                "dtype": dtype,
                "method": label,
                "nfe": plan.nfe,
                "ratio": ratio,
                "meets_target": ratio <= TARGET_RATIO,
                "images_per_s": batch / seconds,
                "peak_mib": peak_mib(),
            }
        )
    return rows


def fit_step_rows(name: str, config, batch: int, nfe: int, remat: bool) -> list[dict]:
    """Memory of one gradient step of LD3 (grid logits of iPNDM-3) and of AMED (the stepwise
    predictor of AMED-Plugin on iPNDM, targets of the teacher's shape) through ``nfe``
    float32 network calls at ``batch``; with ``remat`` every network call is wrapped in
    ``jax.checkpoint`` (its activations recomputed in the backward pass)."""
    config.model.dtype = "float32"
    eps_fn, _, image = network(config)
    schedule = schedule_from_config(config.sde)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, *image), jnp.float32)
    model = model_argument(eps_fn)

    def call(model):
        return jax.checkpoint(model) if remat else model

    ld3_plan = make_plan(schedule, method="ipndm", order=3, nfe=nfe)
    amed_plan = make_plan(schedule, method="amed_ipndm", afs=True, predictor="stepwise", nfe=nfe,
                          nfe_rounding="up")  # fmt: skip

    def ld3_step(theta, model, x_T, x0):
        def loss(p):
            return jnp.mean(ld3.per_sample_loss(ld3_plan, 0.0, p, call(model), x_T, x0))

        return jax.grad(loss)(theta)

    def amed_step(params, model, x_T, targets):
        def loss(p):
            return jnp.mean(amed.per_sample_loss(amed_plan, p, call(model), x_T, targets))

        return jax.grad(loss)(params)

    steps = {
        f"LD3 step (iPNDM-3, NFE {ld3_plan.nfe})": (
            ld3_step, {"theta": jnp.asarray(ld3.init_theta(ld3_plan))}, x
        ),
        f"AMED step (AMED-Plugin, NFE {amed_plan.nfe})": (
            amed_step,
            init_amed_params(amed_plan, eps_fn, x),
            jnp.zeros((batch, amed_plan.num_steps, *image), jnp.float32),
        ),
    }  # fmt: skip
    rows = []
    for label, (step, params, target) in steps.items():
        start = time.perf_counter()
        compiled = jax.jit(step).lower(params, model, x, target).compile()
        mem = compiled.memory_analysis()
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
        total = sum(getattr(mem, f, 0) or 0 for f in fields) if mem is not None else None
        jax.block_until_ready(compiled(params, model, x, target))
        rows.append(
            {
                "network": name,
                "step": label,
                "batch": batch,
                "remat": remat,
                "compiled_mib": None if total is None else total / 2**20,
                "peak_mib": peak_mib(),
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def two_device_check(tiny: bool) -> str:
    """With >= 2 devices: tAB-3 samples of a batch sharded over two devices vs one device."""
    if jax.device_count() < 2:
        return f"2-device check: skipped ({jax.device_count()} device)"
    config = network_configs(tiny)["SongUNet (EDM VP)"]
    eps_fn, _, shape = network(config)
    plan = make_plan(schedule_from_config(config.sde), method="tab", order=3, nfe=10)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, *shape), jnp.float32)
    run = jax.jit(sample, static_argnums=0)
    one = run(plan, model_argument(eps_fn), x)
    mesh = parallel.make_mesh(jax.devices()[:2])  # the project's mesh (automatic axes)
    two = run(plan, model_argument(eps_fn), parallel.shard_batch(x, mesh))
    diff = float(jnp.max(jnp.abs(one - two)) / jnp.max(jnp.abs(one)))
    return (
        f"2-device check: batch 8 sharded over 2 devices vs 1, max relative difference {diff:.3g}"
    )


def table(rows: list[dict], cols: tuple[str, ...]) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = []
        for c in cols:
            v = row[c]
            cells.append("n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict], fit_rows: list[dict], header: str, extra: str) -> str:
    timing = table(rows, ("network", "params_M", "dtype", "method", "nfe", "ratio",
                          "meets_target", "images_per_s", "peak_mib"))  # fmt: skip
    memory = table(fit_rows, ("network", "step", "batch", "remat", "compiled_mib", "peak_mib",
                              "seconds"))  # fmt: skip
    return "\n".join([header, "", *timing, "", *memory, "", extra, ""])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small networks, batch 2 (CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default 256 (2 with --tiny)")
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (1 with --tiny)")
    parser.add_argument("--out", default="results/device_check.md")
    parser.add_argument(
        "--networks", default=",".join(NETWORKS), help=f"comma-separated, of {list(NETWORKS)}"
    )
    parser.add_argument("--fit-batch", type=int, default=None, help="default 8 (2 with --tiny)")
    parser.add_argument("--no-remat", action="store_true", help="fit steps without jax.checkpoint")
    parser.add_argument(
        "--methods",
        default=",".join(label for label, _ in METHODS),
        help="comma-separated labels of the methods to time (default: all)",
    )
    args = parser.parse_args(argv)
    batch = args.batch or (2 if args.tiny else 256)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - {label for label, _ in METHODS})
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed: {[m for m, _ in METHODS]}")
    repeats = args.repeats or (1 if args.tiny else 5)
    start = time.perf_counter()
    rows = []
    chosen = args.networks.split(",")
    if set(chosen) - set(NETWORKS):
        parser.error(f"--networks: unknown {sorted(set(chosen) - set(NETWORKS))}; "
                     f"allowed: {list(NETWORKS)}")  # fmt: skip
    configs = {NETWORKS[k]: network_configs(args.tiny)[NETWORKS[k]] for k in chosen}
    cases = [(n, c, d) for n, c in configs.items() for d in DTYPES]
    fit_batch = args.fit_batch or (2 if args.tiny else 8)
    fit_rows = []
    with progress_bar(len(cases) + len(configs), "device check", unit="part") as bar:
        for name, config, dtype in cases:
            rows.extend(rows_of(name, config, dtype, batch, args.nfe, repeats, methods))
            bar.update(1)
        for name, config in configs.items():
            fit_rows.extend(fit_step_rows(name, config, fit_batch, args.nfe, not args.no_remat))
            bar.update(1)
    header = (
        f"# Device check ({'tiny, ' if args.tiny else ''}batch {batch}, NFE {args.nfe})\n\n"
        f"Device: {machine_description()}. Command: python scripts/device_check.py"
        + (" --tiny" if args.tiny else "")
        + f". Ratio target <= {TARGET_RATIO}."
    )
    extra = two_device_check(args.tiny) + f"\n\nTotal time {time.perf_counter() - start:.0f} s."
    text = markdown(rows, fit_rows, header, extra)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
