"""AMED predictor overhead: sampling with learned step coefficients vs the base solver.

    python scripts/benchmark_amed.py                 # writes results/benchmark_amed.{md,csv}
    python scripts/benchmark_amed.py --batch 512 --nfe 5 7 9 --out results/gpu_amed
    python scripts/benchmark_amed.py --quick --out /tmp/amed   # tiny sizes, a smoke run

AMED (``deis_jax.sampling.solvers.amed``) takes two network calls per step; with learned
parameters (``sample(plan, eps_fn, x_T, rule_params=params)``) a small predictor computes
per-sample coefficients ``r, c, a`` on the device inside the one ``lax.scan``, and without
them the same plan runs its host table (``r = 1/2``: the base solver). This measures what the
predictor costs. Per network, method (default ``amed_ipndm`` and ``amed``, ``--methods``) and
NFE (default 5 and 9, AFS on, so NFE 5 / 9 = 3 / 5 steps), three samplers of one plan:

* ``base``: the plan without rule params (the host table);
* ``predictor``: the plan with predictor params -- the feature-free ``stepwise`` predictor
  (one learned logit per step and head) and, for networks that return their bottleneck
  feature, the ``bottleneck`` predictor of the paper (reads the feature at each step's first
  call through ``eps_with_features``);
* ``bare``: a ``lax.scan`` of the same NFE network calls doing nothing else
  (``scripts/benchmark.py``'s bare loop).

Networks (``--networks``): ``ddpmpp`` -- the digits DDPM++ of ``configs/vpsde_digits.py``
(16x16x1, 0.75M parameters, random initial weights: timing only) whose eps function returns
features; ``mlp`` -- ``scripts/benchmark.py``'s two-layer tanh MLP (``--dim``, ``--hidden``; no
features, so the stepwise predictor only). Everything in float32, batch ``--batch``.

Reported per row: ms per batch of each sampler (median of ``--repeats`` interleaved runs,
``jax.block_until_ready``, after a warm-up call that compiles), the ratios
``predictor / base`` and ``predictor / bare``, the predictor's overhead in ms per step, its
parameter count; for the bottleneck predictor also the cost of returning the feature: one
``eps_with_features`` call vs one plain ``eps_fn`` call (median ms, ratio). ``--quick`` runs
tiny sizes (batch 8, 2 repeats, a 64-D MLP, ``amed_ipndm`` only) as a smoke run.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deis_jax as deis  # noqa: E402
from configs import vpsde_digits  # noqa: E402
from deis_jax.common.files import atomic_write_text  # noqa: E402
from deis_jax.common.reporting import markdown_table, write_csv  # noqa: E402
from deis_jax.experiments.build import schedule_from_config  # noqa: E402
from deis_jax.fitting.amed import init_params  # noqa: E402
from deis_jax.models.features import apply_with_features  # noqa: E402
from deis_jax.models.loading import (  # noqa: E402
    build_model,
    image_shape,
    load_model,
    model_prediction,
)
from deis_jax.sampling.wrappers import (  # noqa: E402
    eps_fn_from_model,
    eps_with_features,
    supports_features,
)
from scripts.benchmark import bare_loop, machine_description, make_eps_fn  # noqa: E402

NETWORKS = ("ddpmpp", "mlp")
METHODS = ("amed_ipndm", "amed")
FIELDS = (
    "network", "batch", "method", "nfe", "steps", "predictor", "predictor_params",
    "bare_ms", "base_ms", "predictor_ms", "base_over_bare", "predictor_over_base",
    "predictor_over_bare", "overhead_ms_per_step",
    "eps_call_ms", "eps_features_call_ms", "features_over_eps", "num_features",
)  # fmt: skip
FEATURE_FIELDS = ("eps_call_ms", "eps_features_call_ms", "features_over_eps", "num_features")
INITS = ("flax", "normal")
DEFAULTS = {"batch": 256, "repeats": 10, "dim": 3072, "hidden": 2048, "nfe": [5, 9],
            "methods": list(METHODS), "init": "flax"}  # fmt: skip
QUICK = {"batch": 8, "repeats": 2, "dim": 64, "hidden": 128, "nfe": [5],
         "methods": ["amed_ipndm"], "init": "normal"}  # fmt: skip


def interleaved_medians(calls, repeats: int) -> list[float]:
    """Median wall seconds of each ``(fn, args)`` in ``calls``, after one warm-up call each.

    The functions run in turn within each repeat (so slow drifts from other processes hit
    them alike), each waited for with ``jax.block_until_ready``.
    """
    for fn, args in calls:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in calls]
    for _ in range(repeats):
        for i, (fn, args) in enumerate(calls):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def count_params(tree) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def _apply(model, params, x, labels, *, features: bool = False):
    """The network in eval mode; ``(out, features)`` with ``features=True``."""
    if features:
        return apply_with_features(model, params, x, labels)
    return model.apply({"params": params}, x, labels, train=False)


def ddpmpp_eps_fn(config, schedule, init: str):
    """The eps function (with features) of ``config``'s network, random weights.

    ``init='flax'``: the network's own initialisers (``load_model(params='random')``; its
    RNG init compiles slowly on CPU); ``'normal'``: N(0, 0.05^2) for every parameter, from
    the shapes alone (``jax.eval_shape``: nothing compiled). Timing does not depend on which.
    """
    if init == "flax":
        return load_model(config, "", schedule, params="random").eps_fn()
    model = build_model(config)
    dummy = jnp.zeros((1, *image_shape(config)), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, jnp.ones((1,))))
    rng = np.random.default_rng(config.seed)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), jnp.float32),
        shapes["params"],
    )
    model_fn = jax.tree_util.Partial(functools.partial(_apply, model), params)
    return eps_fn_from_model(model_fn, schedule, model_prediction(config))


def mlp_eps_fn(dim: int, hidden: int):
    """``scripts/benchmark.py``'s MLP, taking a scalar or a per-sample ``(B,)`` time (AMED's
    intermediate times differ per sample)."""
    base = make_eps_fn(dim, hidden)

    def eps_fn(x, t):
        t = jnp.asarray(t)
        return base(x, t[:, None] if t.ndim == 1 else t)

    return eps_fn


def network(name: str, args):
    """``(schedule, eps_fn, x_T, description)`` of a network, float32."""
    key = jax.random.PRNGKey(1)
    if name == "ddpmpp":
        config = vpsde_digits.get_config()
        schedule = schedule_from_config(config.sde)
        eps_fn = ddpmpp_eps_fn(config, schedule, args.init)
        shape = image_shape(config)
        x = jax.random.normal(key, (args.batch, *shape), jnp.float32)
        desc = "DDPM++ of configs/vpsde_digits.py ({}x{}x{}, {} random weights)".format(
            *shape, "flax-initialised" if args.init == "flax" else "N(0, 0.05^2)"
        )
        return schedule, eps_fn, x, desc
    schedule = deis.VPSDE.linear()
    x = jax.random.normal(key, (args.batch, args.dim), jnp.float32)
    desc = f"MLP {args.dim}→{args.hidden}→{args.dim} (tanh)"
    return schedule, mlp_eps_fn(args.dim, args.hidden), x, desc


def base_sampler(plan, eps_fn):
    """``x_T -> x_0`` with the plan's host table (no rule params), jitted."""
    return jax.jit(lambda x: deis.sample(plan, eps_fn, x))


def rule_sampler(plan, eps_fn):
    """``(x_T, rule_params) -> x_0`` with the predictor, jitted (its params an argument)."""
    return jax.jit(
        lambda x, params: deis.sample(
            plan, eps_fn, x, rule_params=deis.RuleParams.for_plan(plan, params)
        )
    )


def feature_cost(eps_fn, x, repeats: int) -> dict:
    """One ``eps_with_features`` call vs one plain ``eps_fn`` call at t = 0.5 (median ms)."""
    t = jnp.asarray(0.5, x.dtype)
    plain = jax.jit(lambda x: eps_fn(x, t))
    with_features = jax.jit(lambda x: eps_with_features(eps_fn, x, t))
    eps_s, feats_s = interleaved_medians([(plain, (x,)), (with_features, (x,))], repeats)
    num_features = jax.eval_shape(with_features, x)[1].shape[-1]
    return {"eps_call_ms": 1e3 * eps_s, "eps_features_call_ms": 1e3 * feats_s,
            "features_over_eps": feats_s / eps_s, "num_features": num_features}  # fmt: skip


def benchmark(args) -> tuple[list[dict], dict]:
    rows, descriptions = [], {}
    for name in args.networks:
        schedule, eps_fn, x, descriptions[name] = network(name, args)
        kinds = ["stepwise"] + (["bottleneck"] if supports_features(eps_fn) else [])
        features = feature_cost(eps_fn, x, args.repeats) if "bottleneck" in kinds else {}
        for method in args.methods:
            for nfe in args.nfe:
                plans = {
                    kind: deis.make_plan(schedule, method=method, nfe=nfe, afs=True,
                                         scale_time=args.scale_time, predictor=kind)
                    for kind in kinds
                }  # fmt: skip
                plan = plans["stepwise"]  # the host table does not depend on the predictor
                calls = [(bare_loop(eps_fn, plan.nfe), (x,)), (base_sampler(plan, eps_fn), (x,))]
                params = {kind: init_params(p, eps_fn, x) for kind, p in plans.items()}
                calls += [(rule_sampler(plans[k], eps_fn), (x, params[k])) for k in kinds]
                bare_s, base_s, *pred_s = interleaved_medians(calls, args.repeats)
                for kind, seconds in zip(kinds, pred_s, strict=True):
                    row = {
                        "network": name,
                        "batch": args.batch,
                        "method": method,
                        "nfe": plan.nfe,
                        "steps": plan.num_steps,
                        "predictor": kind,
                        "predictor_params": count_params(params[kind]),
                        "bare_ms": 1e3 * bare_s,
                        "base_ms": 1e3 * base_s,
                        "predictor_ms": 1e3 * seconds,
                        "base_over_bare": base_s / bare_s,
                        "predictor_over_base": seconds / base_s,
                        "predictor_over_bare": seconds / bare_s,
                        "overhead_ms_per_step": 1e3 * (seconds - base_s) / plan.num_steps,
                        **(features if kind == "bottleneck" else {}),
                    }
                    print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in row.items()), flush=True)  # fmt: skip
                    rows.append(row)
    return rows, descriptions


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--methods", nargs="+", default=None,
                        choices=("amed", "amed_ddim", "amed_dpm", "amed_ipndm"),
                        help=f"AMED methods (default: {' '.join(METHODS)})")  # fmt: skip
    parser.add_argument("--nfe", type=int, nargs="+", default=None, help="NFE values (5 9)")
    parser.add_argument("--batch", type=int, default=None, help="samples per batch (256)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per sampler (10)")
    parser.add_argument("--dim", type=int, default=None, help="MLP state dimension (3072)")
    parser.add_argument("--hidden", type=int, default=None, help="MLP hidden width (2048)")
    parser.add_argument("--init", choices=INITS, default=None,
                        help="DDPM++ random weights: its flax initialisers or N(0, 0.05^2) "
                        "from the shapes (default flax)")  # fmt: skip
    parser.add_argument("--scale-time", type=float, default=0.2,
                        help="AMED's scale_time option (the a head)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes for a smoke run: " + ", ".join(
                            f"{k} {v}" for k, v in QUICK.items()))  # fmt: skip
    parser.add_argument("--out", default="results/benchmark_amed",
                        help="path prefix for .md/.csv")  # fmt: skip
    args = parser.parse_args(argv)
    for field, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    rows, descriptions = benchmark(args)
    write_csv(args.out + ".csv", rows, FIELDS)
    nets = "; ".join(f"`{k}` = {v}" for k, v in descriptions.items())
    header = (
        f"# AMED predictor overhead\n\nMachine: {machine_description()}.\n\n"
        f"Networks: {nets}; float32, batch {args.batch}, random weights (timing only). "
        f"AFS on, scale_time {args.scale_time}. Command: "
        f"`python scripts/benchmark_amed.py {command}`.\n"
        f"Times: median of {args.repeats} interleaved runs after a compiling warm-up, ms per "
        "batch. `base` = the plan without rule params (host table, r = 1/2); `predictor` = "
        "with predictor params (per-sample coefficients on the device); `bare` = a lax.scan of "
        "the same NFE network calls and nothing else.\n\n"
    )
    main_fields = [f for f in FIELDS if f not in FEATURE_FIELDS]
    table = markdown_table(main_fields, [[r[f] for f in main_fields] for r in rows])
    feats = {r["network"]: r for r in rows if r["predictor"] == "bottleneck"}
    if feats:
        fields = ["network", "batch", *FEATURE_FIELDS]
        table += (
            "\nCost of returning the bottleneck feature (one network call, median ms): "
            "`eps_with_features` vs a plain `eps_fn` call.\n\n"
            + markdown_table(fields, [[r[f] for f in fields] for r in feats.values()])
        )
    atomic_write_text(args.out + ".md", header + table)
    print(header + table)
    return rows


if __name__ == "__main__":
    main()
