"""How far apart two floating-point configurations are on the suite's numerics.

    python scripts/numerics_probe.py        # the test setup vs the second pass's configuration

Runs the same computations in two subprocesses -- the in-process test setup
(tests/conftest.py: x64, most XLA optimisations off) and the configuration of the README
test command's second pass (``SECOND_PASS`` below: XLA's optimising pipeline, no AVX2/FMA
code, numpy without its AVX-512 kernels) -- and prints, per quantity, the largest difference
in units in the last place, the share of values that differ and the largest difference
relative to the array's scale. The quantities are those the ``numerics`` tests check: the
float32 outputs of the EDM and score_sde fixture networks (tests/fixtures), the LD3 logits
and their grid round trip (host numpy and traced), float64 samples of the ring mixture and
numpy's exp / log. A configuration that changes none of these bits would test nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

# The second pass of the README's test command (keep in sync with it and .ci/run).
SECOND_PASS = {
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "0",
    "XLA_FLAGS": "--xla_cpu_max_isa=AVX",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}


def compute(out_file: str) -> None:
    """The quantities, saved to ``out_file`` (runs in a subprocess under one configuration)."""
    for path in (ROOT, TESTS):
        if path not in sys.path:
            sys.path.insert(0, path)
    import conftest  # noqa: F401  (the test setup: x64, optimisations as configured)
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from edm_fixture_models import SMALL_MODELS, fixture_program, small_params
    from flax import serialization

    import deis_jax as deis
    from deis_jax.fitting import ld3
    from deis_jax.models.score_sde import DATA_FIELDS_OF_MODEL, get_model
    from deis_jax.sampling.sampler import make_plan, sample
    from deis_jax.sampling.wrappers import model_argument

    out = {}
    for name in SMALL_MODELS:
        result = fixture_program(name)(small_params(name))
        out[f"EDM {name} F (float32)"] = result["F"]
        out[f"EDM {name} D (float32)"] = result["D"]
    fixtures = os.path.join(TESTS, "fixtures", "score_sde")
    for name in ("vp_cifar10_ddpmpp_continuous_small", "ve_cifar10_ncsnpp_continuous_small"):
        with open(os.path.join(fixtures, f"{name}.json")) as f:
            meta = json.load(f)
        values = dict(meta["model_config"])
        values.update({k: meta["data_config"][k] for k in DATA_FIELDS_OF_MODEL})
        model = get_model(ml_collections.ConfigDict(values))
        with open(os.path.join(fixtures, f"{name}.params.msgpack"), "rb") as f:
            params = serialization.msgpack_restore(f.read())
        io = np.load(os.path.join(fixtures, f"{name}.io.npz"))
        with jax.default_matmul_precision("highest"):
            y = jax.jit(model.apply)({"params": params}, io["x"], io["t"])
        out[f"score_sde {name} (float32)"] = np.asarray(y)

    schedule = deis.VPSDE.linear()
    eps_fn = model_argument(deis.GaussianMixture.ring().eps_fn(schedule))
    x_T = jax.random.normal(jax.random.PRNGKey(0), (64, 2), jnp.float64)
    run = jax.jit(sample, static_argnums=0)
    for label, kwargs in {
        "ddim NFE 2": dict(method="ddim", nfe=2),
        "ipndm3 NFE 4": dict(method="ipndm", order=3, nfe=4),
        "tab3 NFE 7 log-SNR grid": dict(method="tab", order=3, nfe=7, grid="log_snr"),
    }.items():
        plan = make_plan(schedule, **kwargs)
        theta = ld3.init_theta(plan)
        traced = jax.jit(lambda th, plan=plan: ld3.grid_from_params(plan, th))
        out[f"LD3 {label}: logits (numpy float64)"] = theta
        out[f"LD3 {label}: grid round trip (numpy float64)"] = ld3.grid_from_params(plan, theta)
        out[f"LD3 {label}: grid round trip (XLA float64)"] = np.asarray(traced(theta))
        out[f"ring samples, {label} (XLA float64)"] = np.asarray(run(plan, eps_fn, x_T))
    z = np.random.default_rng(0).normal(size=100_000) * 5
    out["numpy exp (float64)"] = np.exp(z)
    out["numpy log (float64)"] = np.log(np.abs(z) + 1e-3)
    np.savez(out_file, **{k: np.asarray(v) for k, v in out.items()})


def _ulps(a, b):
    sys.path.insert(0, TESTS)
    from tolerances import ulp_distance

    return ulp_distance(a, b)


def main() -> None:
    import numpy as np

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("test setup", {}), ("second pass", SECOND_PASS)):
            env = {k: v for k, v in os.environ.items() if k not in SECOND_PASS}
            env.update(extra, JAX_PLATFORMS="cpu")
            path = os.path.join(tmp, f"{len(runs)}.npz")
            subprocess.run([sys.executable, __file__, "--compute", path], env=env, check=True)
            with np.load(path) as data:
                runs[label] = {k: data[k] for k in data.files}
    base, other = runs["test setup"], runs["second pass"]
    print("second pass: " + " ".join(f"{k}={v!r}" for k, v in SECOND_PASS.items()))
    print("| quantity | values | max ulp | differing | max diff / max abs |\n|---|---|---|---|---|")
    for key, a in base.items():
        b = other[key]
        u = _ulps(b, a)
        scale = float(np.max(np.abs(a))) or 1.0
        rel = float(np.max(np.abs(b.astype(np.float64) - a))) / scale
        print(f"| {key} | {a.size} | {int(u.max())} | {np.mean(u > 0):.1%} | {rel:.1e} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--compute":
        compute(sys.argv[2])
    else:
        main()
