"""What bfloat16 networks cost in accuracy (issue 23): ``docs/mixed_precision.md``'s tables.

    python scripts/precision_accuracy.py eps --out results/mixed_precision/eps_error.md
    python scripts/precision_accuracy.py fd --workdir runs/digits \
        --out results/mixed_precision/fd_digits.md

* ``eps``: full-size networks with random weights -- score_sde's DDPM++ deep (CIFAR-10 VP)
  and EDM's SongUNet (``edm-cifar10-32x32-uncond-vp``) -- called as the samplers call them
  (eps), one image per noise level sigma in [0.002, 80] (``x = alpha (x0 + sigma z)``, ``x0``
  uniform in [-1, 1]): the relative error ``|eps_bf16 - eps_f32| / |eps_f32|`` per image.
  The float32 reference runs under ``jax.default_matmul_precision("highest")`` (on a GPU,
  float32 matmuls are TF32 by default). score_sde's DDPM++ initialises the last layer of
  every residual branch at ~0 (``init_scale = 0``); here every layer gets the unit-scale
  initialiser (``init_scale = 1``) so that every branch contributes.
* ``fd``: the trained digits model of ``--workdir`` (``configs/vpsde_digits.py``): FD-digits
  on ``--num-samples`` images (the same x_T for every cell) with float32 and bfloat16
  networks, for tAB-3 and iPNDM-3 at NFE 5, 10, 20 and the fitted samplers
  (``<workdir>/grids/digits/fit_sampler_nfe<N>_recipe_auto.json``) where one exists.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default as default_configs  # noqa: E402
from configs import edm_cifar10_vp, vpsde_digits  # noqa: E402
from deis_jax.common import data, image_grid  # noqa: E402
from deis_jax.common.progress import progress_bar  # noqa: E402
from deis_jax.evaluation import fid  # noqa: E402
from deis_jax.evaluation.features import extractor_from_config, reference_from_config  # noqa: E402
from deis_jax.experiments.build import sampler_from_config, schedule_from_config  # noqa: E402
from deis_jax.models import family_of, loading  # noqa: E402
from deis_jax.models.edm.precond import init_params as init_edm_params  # noqa: E402
from deis_jax.models.score_sde import init_params as init_score_sde_params  # noqa: E402
from deis_jax.models.score_sde.family import model_config  # noqa: E402
from deis_jax.sampling.wrappers import eps_fn_from_model  # noqa: E402

SIGMAS = (0.002, 0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 80.0)
NFES = (5, 10, 20)
DTYPES = ("float32", "bfloat16")


def _t_of_sigma(schedule, sigma: float) -> float:
    """The time whose ``sigma(t) / alpha(t)`` is ``sigma`` (bisection in float64)."""
    lo, hi = 1e-8, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        ratio = float(schedule.sigma(mid)) / float(schedule.alpha(mid))
        lo, hi = (mid, hi) if ratio < sigma else (lo, mid)
    return 0.5 * (lo + hi)


def eps_configs() -> dict:
    ddpmpp = default_configs.get_default_config()
    ddpmpp.model = default_configs.model_block("vp_cifar10_ddpmpp_deep_continuous", init_scale=1.0)
    song = edm_cifar10_vp.get_config()
    return {"DDPM++ deep (score_sde, VP)": ddpmpp, "SongUNet (EDM VP)": song}


def eps_error_rows() -> list[dict]:
    rows = []
    with jax.default_matmul_precision("highest"):
        for name, config in eps_configs().items():
            family = family_of(config)
            schedule = schedule_from_config(config.sde)
            net = family.build(config)
            key = jax.random.PRNGKey(0)
            if config.model.name == "edm":
                params = jax.jit(lambda k, net=net: init_edm_params(net, k))(key)
            else:
                params = jax.jit(lambda k, c=config: init_score_sde_params(model_config(c), k))(key)
            size = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
            ts = np.array([_t_of_sigma(schedule, s) for s in SIGMAS])
            res = config.data.image_size
            k0, kz = jax.random.split(jax.random.PRNGKey(1))
            x0 = jax.random.uniform(k0, (len(ts), res, res, 3), minval=-1.0, maxval=1.0)
            z = jax.random.normal(kz, x0.shape)
            alpha = np.asarray(schedule.alpha(ts), np.float32)[:, None, None, None]
            x = alpha * (x0 + np.asarray(SIGMAS, np.float32)[:, None, None, None] * z)
            t = jnp.asarray(ts, jnp.float32)
            out = {}
            for dtype in DTYPES:
                config.model.dtype = dtype
                net = family.build(config)
                fn = family.model_fn(config, net, params, None)
                eps_fn = eps_fn_from_model(fn, schedule, family.prediction(config))
                out[dtype] = np.asarray(jax.jit(eps_fn)(x, t), np.float64)
                print(f"{name} {dtype} done", flush=True)
            err = np.linalg.norm((out["bfloat16"] - out["float32"]).reshape(len(ts), -1), axis=1)
            ref = np.linalg.norm(out["float32"].reshape(len(ts), -1), axis=1)
            rows.append({"network": f"{name}, {size / 1e6:.1f}M", "errors": err / ref})
    return rows


def eps_markdown(rows: list[dict]) -> str:
    head = "| network | " + " | ".join(f"σ={s:g}" for s in SIGMAS) + " |"
    lines = [head, "|" + "---|" * (len(SIGMAS) + 1)]
    for row in rows:
        cells = " | ".join(f"{e:.2e}" for e in row["errors"])
        lines.append(f"| {row['network']} | {cells} |")
    return "\n".join(lines)


def fd_rows(workdir: str, num_samples: int, batch: int) -> list[dict]:
    config = vpsde_digits.get_config()
    schedule = schedule_from_config(config.sde)
    extractor = extractor_from_config(config)
    reference = reference_from_config(config, workdir, extractor)
    shape = (num_samples, config.data.image_size, config.data.image_size, 1)
    x_T = schedule.prior_sample(jax.random.PRNGKey(0), shape)
    cells = [("tAB-3", dict(method="tab", order=3)), ("iPNDM-3", dict(method="ipndm", order=3))]
    grids = os.path.join(workdir, "grids", "digits")
    rows = []
    jobs = [(label, opts, nfe) for nfe in NFES for label, opts in cells]
    for nfe in NFES:
        path = os.path.join(grids, f"fit_sampler_nfe{nfe}_recipe_auto.json")
        if os.path.isfile(path):
            jobs.append(("fit_sampler (recipe auto)", {"fitted_file": path}, nfe))
    with progress_bar(len(jobs) * len(DTYPES), "FD-digits cells", unit="cell") as bar:
        for label, opts, nfe in jobs:
            row = {"method": label, "nfe": nfe}
            for dtype in DTYPES:
                config.model.dtype = dtype
                model = loading.load_model(config, workdir, schedule)
                eps_fn = model.eps_fn()
                sampler = sampler_from_config(config.sampler, schedule, eps_fn, nfe=nfe, **opts)
                run = jax.jit(sampler)
                images = []
                for i in range(0, num_samples, batch):
                    x = np.asarray(run(x_T[i : i + batch]))
                    images.append(image_grid.to_uint8(data.postprocess(x, True)))
                stats = fid.stats_of_images(extractor, images)["stats"]
                row[dtype] = fid.fd_from_stats(stats, (reference["mu"], reference["sigma"]))
                bar.update(1)
            rows.append(row)
    return rows


def fd_markdown(rows: list[dict]) -> str:
    lines = ["| method | NFE | FD-digits float32 | FD-digits bfloat16 |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['nfe']} | {r['float32']:.1f} | {r['bfloat16']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("eps", "fd"))
    parser.add_argument("--workdir", default="runs/digits")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.part == "eps":
        text = eps_markdown(eps_error_rows())
    else:
        text = fd_markdown(fd_rows(args.workdir, args.num_samples, args.batch))
    command = "python scripts/precision_accuracy.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = (
        f"Command: `{command}`; jax {jax.__version__}, {jax.devices()[0].device_kind}.\n\n{text}\n"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
