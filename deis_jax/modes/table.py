"""``--mode=table``: reproduce a paper's sampler table -- every method x NFE, FID or FD-digits.

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits --mode=table \
        --config.table=deis_cifar10

(with ``configs/tables.py``'s fields in the config; ``--config=configs/tables.py:vpsde_digits``
adds them to any experiment config). ``config.table`` names a registered ``TableSpec``:

``deis_cifar10``       DEIS Table "Variants of DEIS on CIFAR10": DDIM, rho2Heun, rho3Kutta,
                       rho4RK, rhoAB1-3, tAB1-3 at NFE 5, 10, 15, 20, 50 on the config's grid
                       (quadratic t, as the DEIS code). Runge-Kutta rows round up to whole
                       steps; the real NFE is shown as a "+k" superscript, as in the paper.
``ipndm_ersde_dpmpp``  The peer samplers of the AMED / diff-solvers CIFAR-10 table that exist
                       here -- DPM-Solver++(3M) and UniPC-3 (log-SNR grid, lower-order final
                       steps), iPNDM, DDIM and EDM-Heun (rho=7 grid), DEIS-tAB3 (quadratic t) --
                       and ER-SDE-Solver-3 (stochastic, rho=7 grid), at NFE 3, 5, 7, 9, 20.
                       Their published numbers were measured on EDM's network, so only the
                       shape of the table is comparable. (DPM-Solver-2 and the AMED rows have
                       no method in the registry yet.)

More tables (e.g. AMED once an ``amed`` method is registered) are added with
``register_table(TableSpec(...))``; rows name a ``deis_jax.sampling.method_spec`` string, per-row
sampler overrides (grid, options) and the row of ``deis_jax.evaluation.paper_numbers`` they
are compared with. Nothing else changes.

Every cell draws ``config.eval.num_samples`` images from the same x_T (sample ``i`` starts at
``fold_in(key, i)``, so cells differ only by the sampler), quantises them to uint8 as a saved
image would be, and streams them through the feature extractor (``fid.FeatureStats``); the
Frechet distance is taken against the reference statistics of the data (or a given stats
file). Optional: Inception Score / its digits analogue, KID, and the RMSE against a reference
ODE solve on the first ``rmse_num_samples`` x_T (deterministic rows).

Each finished cell is appended to ``<workdir>/tables/<table>/cells.jsonl`` with a fingerprint
of everything that affects it (model, checkpoint step, SDE, sampler base settings, eval
settings, extractor weights); a re-run skips finished cells, so a killed run resumes. The
outputs ``table.md`` (ours and the paper's numbers side by side), ``table.csv`` and
``metric_vs_nfe.png`` (log-log) are rewritten atomically after every cell / at the end, and
copied to ``<config.eval.export>.{md,csv,png}`` when set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from deis_jax import build
from deis_jax import config_validation as cv
from deis_jax.evaluation import fid
from deis_jax.evaluation.paper_numbers import PAPER_TABLES, PaperValue, with_extra_nfe
from deis_jax.io_utils import append_jsonl, atomic_write_bytes, atomic_write_text, read_jsonl
from deis_jax.reporting import markdown_table, plot_metric_vs_nfe, write_csv
from deis_jax.sampling.method_spec import MethodChoice, parse_method_spec

METRICS = ("fid", "fd_digits")
METRIC_LABEL = {"fid": "FID", "fd_digits": "FD-digits"}
PARAMS = ("checkpoint", "random")
BOOL = (True, False)


# --------------------------------------------------------------------------------------------
# table registry


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One method of a table: ``spec`` (``deis_jax.sampling.method_spec``), ``overrides`` of
    ``config.sampler`` fields (``grid``, ``grid_power``, ``final_denoise``, ``options``) and
    the published row it is compared with, ``paper = (paper table key, row name)``."""

    label: str
    spec: str
    overrides: dict = dataclasses.field(default_factory=dict)
    paper: tuple[str, str] | None = None

    @property
    def choice(self) -> MethodChoice:
        return parse_method_spec(self.spec)

    def paper_value(self, nfe: int) -> PaperValue | None:
        if self.paper is None or self.paper[0] not in PAPER_TABLES:
            return None
        return PAPER_TABLES[self.paper[0]].get(self.paper[1], nfe)


@dataclasses.dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    rows: tuple[TableRow, ...]
    nfes: tuple[int, ...]
    notes: str = ""


TABLES: dict[str, TableSpec] = {}


def register_table(spec: TableSpec) -> TableSpec:
    if spec.name in TABLES:
        raise ValueError(f"table {spec.name!r} is already registered")
    labels = [r.label for r in spec.rows]
    if len(set(labels)) != len(labels):
        raise ValueError(f"table {spec.name!r} has duplicate row labels {labels}")
    TABLES[spec.name] = spec
    return spec


def _deis(label: str, spec: str) -> TableRow:
    return TableRow(label, spec, {}, ("deis_cifar10", label))


register_table(
    TableSpec(
        name="deis_cifar10",
        title="Variants of DEIS (DEIS paper, CIFAR-10 table)",
        rows=(
            _deis("DDIM", "ddim"),
            _deis("ρ2Heun", "rhork2:tableau=heun"),
            _deis("ρ3Kutta", "rhork3:tableau=kutta3"),
            _deis("ρ4RK", "rhork4:tableau=rk4"),
            _deis("ρAB1", "rhoab1"),
            _deis("ρAB2", "rhoab2"),
            _deis("ρAB3", "rhoab3"),
            _deis("tAB1", "tab1"),
            _deis("tAB2", "tab2"),
            _deis("tAB3", "tab3"),
        ),
        nfes=(5, 10, 15, 20, 50),
        notes="Every row uses config.sampler's grid (DEIS: quadratic in t, t0 = 1e-3).",
    )
)

_LOG_SNR_LOF = {"grid": "log_snr", "options": {"lower_order_final_below": None}}

register_table(
    TableSpec(
        name="ipndm_ersde_dpmpp",
        title="Training-free peers (AMED / diff-solvers CIFAR-10 table, ER-SDE)",
        rows=(
            TableRow(
                "DPM-Solver++(3M)", "dpmpp3", _LOG_SNR_LOF, ("amed_cifar10", "DPM-Solver++(3M)")
            ),
            TableRow("UniPC", "unipc3", {"grid": "log_snr"}, ("amed_cifar10", "UniPC")),
            TableRow("iPNDM", "ipndm3", {"grid": "karras"}, ("amed_cifar10", "iPNDM")),
            TableRow("DDIM", "ddim", {"grid": "karras"}, ("amed_cifar10", "DDIM")),
            TableRow(
                "EDM (Heun)",
                "rhork2:tableau=heun",
                {"grid": "karras"},
                ("amed_cifar10", "EDM (Heun)"),
            ),
            TableRow(
                "DEIS-tAB3",
                "tab3",
                {"grid": "quadratic"},
                ("deis_tab3_cifar10_diffsolvers", "DEIS-tAB3"),
            ),
            TableRow(
                "ER-SDE-Solver-3",
                "ersde3",
                {"grid": "karras"},
                ("ersde_cifar10", "ER-SDE-Solver-3"),
            ),
        ),
        nfes=(3, 5, 7, 9, 20),
        notes=(
            "Published numbers are on EDM's CIFAR-10 network (not score_sde's), with "
            "dynamic thresholding for DPM-Solver++/UniPC: compare shapes, not values. "
            "DPM-Solver-2 and the AMED rows of the published table have no method here yet."
        ),
    )
)


# --------------------------------------------------------------------------------------------
# validation


def _eval_field(config, name: str):
    return cv.get_field(config, f"eval.{name}")


def selected_rows(config, spec: TableSpec) -> list[TableRow]:
    wanted = _eval_field(config, "methods")
    if wanted is None:
        return list(spec.rows)
    labels = {r.label: r for r in spec.rows}
    if isinstance(wanted, str):
        wanted = (wanted,)
    unknown = [w for w in wanted if w not in labels]
    if unknown or not wanted:
        raise cv.ConfigError(
            f"config.eval.methods must be a non-empty subset of {tuple(labels)}, got {wanted!r}"
        )
    return [labels[w] for w in wanted]


def selected_nfes(config, spec: TableSpec) -> list[int]:
    if _eval_field(config, "nfes") is None:
        return list(spec.nfes)
    return cv.require_int_list(config, "eval.nfes", minimum=1)


def build_sampler(config, schedule, row: TableRow, nfe: int, eps_fn=None):
    """``config.sampler`` with the row's method and overrides at an NFE budget."""
    choice = row.choice
    overrides = dict(row.overrides)
    options = {**choice.options, **overrides.pop("options", {})}
    return build.sampler_from_config(
        config.sampler,
        schedule,
        (lambda x, t: x) if eps_fn is None else eps_fn,
        method=choice.method,
        order=choice.order,
        nfe=nfe,
        options=options,
        **overrides,
    )


def validate(config) -> tuple[TableSpec, list[TableRow], list[int]]:
    from deis_jax.modes.train import validate_model_and_data

    schedule = cv.validate_sde(config)
    cv.validate_sampler(config, schedule)
    validate_model_and_data(config)
    try:
        config.eval  # noqa: B018
        config.table  # noqa: B018
    except (AttributeError, KeyError):
        raise cv.ConfigError(
            "config.table / config.eval are missing: add them with "
            "configs/tables.py's add_table_fields(config), or run with "
            "--config=configs/tables.py:<experiment config name>"
        ) from None
    name = cv.require_choice(config, "table", tuple(TABLES))
    spec = TABLES[name]
    metric = cv.require_choice(config, "eval.metric", METRICS)
    n = cv.require_number(config, "eval.num_samples", integer=True, minimum=2)
    cv.require_number(config, "eval.batch_size", integer=True, minimum=1)
    cv.require_number(config, "eval.seed", integer=True, minimum=0)
    for flag in ("inception_score", "kid", "rmse"):
        cv.require_choice(config, f"eval.{flag}", BOOL)
    if config.eval.inception_score:
        cv.require_number(config, "eval.is_splits", integer=True, minimum=1, maximum=n)
    if config.eval.kid:
        cv.require_number(config, "eval.kid_subsets", integer=True, minimum=1)
        cv.require_number(config, "eval.kid_subset_size", integer=True, minimum=2)
    if config.eval.rmse:
        cv.require_number(config, "eval.rmse_num_samples", integer=True, minimum=1, maximum=n)
        cv.require_number(config, "eval.rmse_reference_steps", integer=True, minimum=10)
    cv.require_choice(config, "eval.params", PARAMS)
    cv.require_number(config, "eval.reference_max_images", integer=True, minimum=2, allow_none=True)
    ref = _eval_field(config, "reference_stats")
    if ref is not None and not os.path.isfile(ref):
        raise cv.ConfigError(f"config.eval.reference_stats: no file at {ref!r}")
    if metric == "fd_digits":
        shape = (config.data.name, config.data.image_size, config.data.num_channels)
        if shape != ("digits", 16, 1):
            raise cv.ConfigError(
                f"config.eval.metric='fd_digits' needs config.data = digits at 16x16x1, got "
                f"{shape}; use metric 'fid' for other datasets"
            )
    if metric == "fid":
        from deis_jax.evaluation.inception import InceptionWeightsError, _instructions

        path = _eval_field(config, "inception_weights")
        if not path or not os.path.isfile(path):
            where = f"no file at {path!r}" if path else "it is not set"
            raise cv.ConfigError(
                f"config.eval.inception_weights: {where}. " + _instructions(path)
            ) from InceptionWeightsError(where)
    rows = selected_rows(config, spec)
    nfes = selected_nfes(config, spec)
    for row in rows:
        for nfe in nfes:
            try:
                build_sampler(config, schedule, row, nfe)
            except ValueError as err:
                raise cv.ConfigError(
                    f"table {name!r} row {row.label!r} ({row.spec}) at NFE {nfe}: {err}"
                ) from None
    return spec, rows, nfes


# --------------------------------------------------------------------------------------------
# model, extractor, reference statistics


@dataclasses.dataclass
class TableModel:
    """``eps_fn(params)`` builds the noise prediction from parameters that are passed into
    the jitted sampler as arguments (not baked in as constants); ``identity`` goes into the
    cache fingerprint."""

    eps_fn: Callable[[Any], Callable]
    params: Any
    identity: dict


def _latest_step(workdir: str) -> int | None:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
    return max(steps) if steps else None


def params_digest(params) -> str:
    """sha256 of every parameter's path, dtype, shape and bytes (the cache identifies the
    weights themselves, not just a checkpoint step that a retraining would reuse)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def model_from_config(config, workdir: str, schedule) -> TableModel:
    from deis_jax.sampling.wrappers import eps_fn_from_model
    from deis_jax.training import train as training

    model = training.build_model(config)
    if config.eval.params == "random":
        logging.warning("config.eval.params='random': an UNTRAINED network (smoke test only)")
        shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
        params = model.init(
            jax.random.PRNGKey(config.seed), jnp.zeros((1, *shape)), jnp.ones((1,)), train=False
        )["params"]
        identity = {"params": "random", "seed": config.seed}
    else:
        from deis_jax.modes.sample import load_sampling_params

        params = load_sampling_params(config, workdir, model)
        ckpt = config.sampling.get("checkpoint")
        identity = {"checkpoint": ckpt} if ckpt else {"workdir_step": _latest_step(workdir)}
        identity["params_sha256"] = params_digest(params)
    prediction = training.model_prediction(config)

    def eps_fn(p):
        apply = lambda x, labels: model.apply({"params": p}, x, labels, train=False)  # noqa: E731
        return eps_fn_from_model(apply, schedule, prediction)

    identity["model"] = config.model.to_dict()
    return TableModel(eps_fn, params, identity)


def extractor_from_config(config):
    if config.eval.metric == "fd_digits":
        from deis_jax.evaluation.digits_classifier import DigitsClassifier

        return DigitsClassifier.load()
    from deis_jax.evaluation.inception import InceptionExtractor

    return InceptionExtractor.from_file(
        config.eval.inception_weights, config.eval.get("inception_sha256")
    )


def reference_from_config(config, workdir: str, extractor, keep_features: bool) -> dict:
    path = config.eval.get("reference_stats")
    if path:
        mu, sigma, meta = fid.load_stats(path)
        if mu.shape[0] != extractor.feature_dim:
            raise ValueError(
                f"{path} holds {mu.shape[0]}-d statistics, the extractor gives "
                f"{extractor.feature_dim}-d features"
            )
        if keep_features:
            raise ValueError("config.eval.kid needs reference features, not a stats file")
        return {"mu": mu, "sigma": sigma, "n": meta.get("n"), "source": path}
    split = config.eval.reference_split
    cache = os.path.join(
        workdir, "tables", f"reference_{extractor.name}_{config.data.name.replace('/', '_')}_"
        f"{split}.npz",
    )  # fmt: skip
    out = fid.reference_stats(
        extractor,
        config.data,
        split=split,
        max_images=config.eval.get("reference_max_images"),
        cache_path=cache,
        keep_features=keep_features,
    )
    out["n"] = out["stats"].n
    out["source"] = f"{config.data.name} {split} ({out['stats'].n} images)"
    return out


# --------------------------------------------------------------------------------------------
# sampling one cell


def _fingerprint(config, model: TableModel, extractor) -> str:
    ev = config.eval
    keys = {
        "sde": config.sde.to_dict(),
        "data": [config.data.name, config.data.image_size, config.data.num_channels,
                 config.data.centered],
        "sampler": {k: config.sampler.get(k) for k in
                    ("grid", "grid_power", "t0", "t1", "final_denoise")},
        "sampler_options": config.sampler.get("options").to_dict()
        if config.sampler.get("options") is not None else {},
        "model": model.identity,
        "extractor": [extractor.name, extractor.weights_sha256],
        "eval": {k: ev.get(k) for k in
                 ("metric", "num_samples", "seed", "inception_score", "is_splits", "kid",
                  "kid_subsets", "kid_subset_size", "rmse", "rmse_num_samples",
                  "rmse_reference_steps", "reference_stats", "reference_split",
                  "reference_max_images")},
    }  # fmt: skip
    return hashlib.sha1(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cell_key(row: TableRow, nfe: int) -> str:
    return f"{row.label}|{row.spec}|{json.dumps(row.overrides, sort_keys=True)}|{nfe}"


class CellRunner:
    """Samples, featurises and scores cells; ``generate_calls`` counts sampling batches."""

    def __init__(self, config, schedule, model: TableModel, extractor, reference: dict):
        from deis_jax.training import train as training

        self.config, self.schedule, self.model = config, schedule, model
        self.extractor, self.reference = extractor, reference
        self.mesh = training.make_mesh(jax.local_devices())
        ev = config.eval
        self.n = int(ev.num_samples)
        self.batch = math.ceil(int(ev.batch_size) / self.mesh.size) * self.mesh.size
        self.shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
        self.noise_key, self.sampler_key = jax.random.split(jax.random.PRNGKey(int(ev.seed)))
        self.generate_calls = 0
        self.rmse_ref = None

    def x_T(self, start: int, count: int) -> jax.Array:
        index = start + jnp.arange(count)
        keys = jax.vmap(lambda i: jax.random.fold_in(self.noise_key, i))(index)
        return jax.vmap(lambda k: self.schedule.prior_sample(k, self.shape))(keys)

    def _generate_fn(self, sampler):
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        sharding = NamedSharding(self.mesh, P("data"))
        batch, model = self.batch, self.model

        def generate(params, offset):
            bound = dataclasses.replace(sampler, eps_fn=model.eps_fn(params))
            x_T = jax.lax.with_sharding_constraint(self.x_T(offset, batch), sharding)
            return bound(x_T, self.sampler_key, offset) if sampler.stochastic else bound(x_T)

        return jax.jit(generate, out_shardings=sharding)

    def batches(self) -> list[int]:
        """Offsets of this process's batches (strided over processes)."""
        offsets = list(range(0, self.n, self.batch))
        return offsets[jax.process_index() :: jax.process_count()]

    def reference_x0(self):
        """Reference-solve endpoints for the first ``rmse_num_samples`` x_T (computed once)."""
        if self.rmse_ref is None:
            from deis_jax.evaluation.reference import reference_solve

            ev = self.config.eval
            t0 = self.config.sampler.t0
            t1 = self.config.sampler.t1
            t0 = self.schedule.default_t0 if t0 is None else t0
            t1 = self.schedule.default_t1 if t1 is None else t1
            eps_fn = self.model.eps_fn(self.model.params)
            x_T = self.x_T(0, int(ev.rmse_num_samples))
            self.rmse_ref = reference_solve(
                self.schedule, eps_fn, x_T, t0=t0, t1=t1, steps=int(ev.rmse_reference_steps)
            )
            logging.info(
                "reference solve: %d NFE, error estimate %.2e",
                self.rmse_ref.nfe, self.rmse_ref.error_estimate,
            )  # fmt: skip
        return self.rmse_ref

    def run_cell(self, sampler, progress: Callable[[int], None] | None = None) -> dict:
        from deis_jax import data, image_grid

        ev = self.config.eval
        start = time.perf_counter()
        generate = self._generate_fn(sampler)
        stats = fid.FeatureStats.empty(self.extractor.feature_dim)
        is_stats = (
            fid.ISStats.empty(self.extractor.num_classes, self.n, int(ev.is_splits))
            if ev.inception_score
            else None
        )
        feats, rmse_out = [], []
        m = int(ev.rmse_num_samples) if (ev.rmse and not sampler.stochastic) else 0
        nonfinite = 0
        for offset in self.batches():
            x = np.asarray(jax.device_get(generate(self.model.params, jnp.int32(offset))))
            self.generate_calls += 1
            count = min(self.batch, self.n - offset)
            x = x[:count]
            nonfinite += int(np.sum(~np.all(np.isfinite(x.reshape(count, -1)), axis=1)))
            if offset < m:
                rmse_out.append(x[: m - offset].astype(np.float64))
            images = image_grid.to_uint8(
                data.postprocess(np.nan_to_num(x), self.config.data.centered)
            )
            f, logits = self.extractor.features_and_logits(images)
            f = np.asarray(jax.device_get(f), np.float64)
            stats.update(f)
            if is_stats is not None:
                is_stats.update(np.asarray(jax.device_get(logits)), offset + np.arange(count))
            if ev.kid:
                feats.append(f.astype(np.float32))
            if progress is not None:
                progress(count * sampler.nfe)
        stats = fid.allgather_stats(stats)
        record: dict[str, Any] = {
            "value": fid.frechet_distance(
                stats.mean, stats.cov, self.reference["mu"], self.reference["sigma"]
            ),
            "num_samples": stats.n,
            "nonfinite_samples": nonfinite,
        }
        if is_stats is not None:
            record["is_mean"], record["is_std"] = _allgather_is(is_stats).result()
        if ev.kid:
            record["kid_mean"], record["kid_std"] = fid.kernel_inception_distance(
                np.concatenate(feats),
                self.reference["features"],
                int(ev.kid_subsets),
                int(ev.kid_subset_size),
                seed=int(ev.seed),
            )
        if m:
            from deis_jax.evaluation.discretization import reference_output
            from deis_jax.evaluation.metrics import rmse

            ref = self.reference_x0()
            bound = dataclasses.replace(sampler, eps_fn=self.model.eps_fn(self.model.params))
            record["rmse"] = rmse(np.concatenate(rmse_out)[:m], reference_output(bound, ref))
            record["rmse_reference_error"] = ref.error_estimate
        record["seconds"] = time.perf_counter() - start
        if nonfinite:
            logging.warning("%d of %d samples are not finite", nonfinite, stats.n)
        return record


def _allgather_is(is_stats: fid.ISStats) -> fid.ISStats:
    if jax.process_count() == 1:
        return is_stats
    from jax.experimental import multihost_utils

    tree = {"count": is_stats.count, "sum_p": is_stats.sum_p, "sum_plogp": is_stats.sum_plogp}
    g = multihost_utils.process_allgather(tree)
    return fid.ISStats(
        is_stats.total,
        is_stats.splits,
        np.sum(g["count"], 0),
        np.sum(g["sum_p"], 0),
        np.sum(g["sum_plogp"], 0),
    )


# --------------------------------------------------------------------------------------------
# the mode


def run(
    config,
    workdir: str,
    *,
    model: TableModel | None = None,
    extractor=None,
    runner_hook: Callable[[CellRunner], None] | None = None,
) -> list[dict]:
    """Run (or resume) the table; returns the cell records. ``model`` / ``extractor``
    replace the config's (tests use an analytic eps and a small extractor)."""
    spec, rows, nfes = validate(config)
    schedule = build.schedule_from_config(config.sde)
    out_dir = os.path.join(workdir, "tables", spec.name)
    os.makedirs(out_dir, exist_ok=True)
    model = model_from_config(config, workdir, schedule) if model is None else model
    extractor = extractor_from_config(config) if extractor is None else extractor
    fingerprint = _fingerprint(config, model, extractor)
    cache_path = os.path.join(out_dir, "cells.jsonl")
    done = {
        r["key"]: r["record"] for r in read_jsonl(cache_path) if r.get("fingerprint") == fingerprint
    }
    cells = [(row, nfe, build_sampler(config, schedule, row, nfe)) for row in rows for nfe in nfes]
    todo = [c for c in cells if _cell_key(c[0], c[1]) not in done]
    logging.info(
        "table %s: %d cells, %d cached, %d to run (%d samples each, metric %s)",
        spec.name, len(cells), len(cells) - len(todo), len(todo), config.eval.num_samples,
        config.eval.metric,
    )  # fmt: skip
    reference = reference_from_config(
        config, workdir, extractor, keep_features=bool(config.eval.kid and todo)
    )
    runner = CellRunner(config, schedule, model, extractor, reference) if todo else None
    if runner is not None and runner_hook is not None:
        runner_hook(runner)
    ctx = _context(config, spec, schedule, model, extractor, reference, fingerprint)
    total = sum(s.nfe for _, _, s in todo) * int(config.eval.num_samples)
    bar = tqdm(
        total=total, desc=f"table {spec.name}", unit="eval", unit_scale=True, dynamic_ncols=True,
        disable=total == 0,
    )  # fmt: skip
    for row, nfe, sampler in todo:
        bar.set_postfix_str(f"{row.label} NFE {nfe}")
        result = runner.run_cell(sampler, bar.update)
        record = {
            "table": spec.name,
            "method": row.label,
            "spec": row.spec,
            "grid": row.overrides.get("grid") or config.sampler.grid or sampler_default_grid(row),
            "nfe_budget": nfe,
            "nfe": sampler.nfe,
            "metric": METRIC_LABEL[config.eval.metric],
            **result,
        }
        append_jsonl(
            cache_path,
            {"key": _cell_key(row, nfe), "fingerprint": fingerprint, "record": record},
        )
        done[_cell_key(row, nfe)] = record
        logging.info(
            "%s NFE %d (spent %d): %s %.4g  [%.1f s]",
            row.label, nfe, sampler.nfe, record["metric"], record["value"], record["seconds"],
        )  # fmt: skip
        write_outputs(out_dir, spec, rows, nfes, done, ctx, plot=False)
    bar.close()
    records = write_outputs(out_dir, spec, rows, nfes, done, ctx, plot=True)
    export = config.eval.get("export")
    if export:
        for ext, name in (("md", "table.md"), ("csv", "table.csv"), ("png", "metric_vs_nfe.png")):
            with open(os.path.join(out_dir, name), "rb") as f:
                atomic_write_bytes(f"{export}.{ext}", f.read())
        logging.info("exported %s.{md,csv,png}", export)
    return records


def sampler_default_grid(row: TableRow) -> str:
    from deis_jax.sampling import solvers

    return solvers.get_method(row.choice.method).default_grid


def _describe_model(identity: dict) -> str:
    if identity.get("checkpoint"):
        where = f"checkpoint {identity['checkpoint']}"
    elif identity.get("workdir_step") is not None:
        where = f"workdir EMA parameters at step {identity['workdir_step']}"
    else:
        where = str(identity.get("params") or identity.get("model") or "given model")
    digest = identity.get("params_sha256")
    return where + (f" (params sha256 {digest[:12]}…)" if digest else "")


def _context(config, spec, schedule, model, extractor, reference, fingerprint) -> dict:
    ev = config.eval
    ctx = {
        "metric": METRIC_LABEL[ev.metric],
        "num_samples": int(ev.num_samples),
        "extractor": f"{extractor.name} (weights sha256 {extractor.weights_sha256[:12]}…)",
        "reference": None if reference is None else reference.get("source"),
        "sde": config.sde.name,
        "t0": config.sampler.t0 if config.sampler.t0 is not None else schedule.default_t0,
        "t1": config.sampler.t1 if config.sampler.t1 is not None else schedule.default_t1,
        "grid": config.sampler.grid,
        "fingerprint": fingerprint,
        "model": _describe_model(model.identity),
        "notes": spec.notes,
        "rmse_steps": int(ev.rmse_reference_steps) if ev.rmse else None,
    }
    return ctx


# --------------------------------------------------------------------------------------------
# outputs


CSV_FIELDS = (
    "table", "method", "spec", "grid", "nfe_budget", "nfe", "metric", "value", "paper",
    "paper_nfe", "is_mean", "is_std", "kid_mean", "kid_std", "rmse", "rmse_reference_error",
    "num_samples", "nonfinite_samples", "seconds",
)  # fmt: skip


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def write_outputs(out_dir, spec: TableSpec, rows: Sequence[TableRow], nfes, done, ctx, *, plot):
    records = []
    for row in rows:
        for nfe in nfes:
            rec = done.get(_cell_key(row, nfe))
            paper = row.paper_value(nfe)
            if rec is None:
                continue
            rec = dict(rec)
            rec["paper"] = None if paper is None else paper.value
            rec["paper_nfe"] = None if paper is None else nfe + paper.extra_nfe
            records.append(rec)
    write_csv(os.path.join(out_dir, "table.csv"), records, CSV_FIELDS)
    index = {(r["method"], r["nfe_budget"]): r for r in records}
    metric = ctx["metric"]

    def cell(row, nfe, key, digits=4):
        r = index.get((row.label, nfe))
        if r is None or r.get(key) is None:
            return "—"
        return with_extra_nfe(_fmt(r[key], digits), r["nfe"] - r["nfe_budget"])

    headers = ["method"]
    for nfe in nfes:
        headers += [f"NFE {nfe}", "paper"]
    main_rows = []
    for row in rows:
        line = [row.label]
        for nfe in nfes:
            paper = row.paper_value(nfe)
            line += [cell(row, nfe, "value"), "—" if paper is None else paper.text()]
        main_rows.append(line)
    sections = [
        f"# {spec.title}: {metric} (ours) and the paper's numbers\n",
        f"Model: {ctx['model']}. "
        f"Our {metric} on {ctx['num_samples']} samples per cell against {ctx['reference']}; "
        f"extractor {ctx['extractor']}. SDE {ctx['sde']}, t0 = {ctx['t0']}, t1 = {ctx['t1']}, "
        f"default grid {ctx['grid']}. ⁺k: the sampler spent k NFE more than the column "
        f"(Runge-Kutta rounds up to whole steps), as the superscripts in the paper. "
        f"{ctx['notes']}\n",
        markdown_table(headers, main_rows),
    ]
    extra = [("is_mean", "IS (extractor logits)", 4), ("kid_mean", "KID", 3)]
    ref_err = [r["rmse_reference_error"] for r in records if r.get("rmse_reference_error")]
    ref_note = f", its error estimate {max(ref_err):.1e}" if ref_err else ""
    extra.append(
        (
            "rmse",
            f"RMSE vs a reference ODE solve on the first x_T (RK4 in ρ, {ctx['rmse_steps']} "
            f"and {2 * (ctx['rmse_steps'] or 0)} steps{ref_note})",
            3,
        )
    )
    for key, title, digits in extra:
        if any(r.get(key) is not None for r in records):
            body = [[row.label] + [cell(row, n, key, digits) for n in nfes] for row in rows]
            sections.append(f"## {title}\n\n" + markdown_table(
                ["method"] + [f"NFE {n}" for n in nfes], body))  # fmt: skip
    seconds = sum(r.get("seconds") or 0.0 for r in records)
    sections.append(
        f"{len(records)} cells, {seconds / 60:.1f} min of sampling and scoring "
        f"(cache fingerprint {ctx['fingerprint']}).\n"
    )
    atomic_write_text(os.path.join(out_dir, "table.md"), "\n".join(sections))
    if plot:
        panels = [(f"ours: {metric}", _curves(rows, nfes, index, "value"))]
        paper_curves = {}
        for row in rows:
            pts = [(n + p.extra_nfe, p.value) for n in nfes if (p := row.paper_value(n))]
            if pts:
                paper_curves[row.label] = ([p[0] for p in pts], [p[1] for p in pts])
        if paper_curves:
            panels.append(("paper: FID", paper_curves))
        if any(r.get("rmse") is not None for r in records):
            panels.append(("ours: RMSE vs reference solve", _curves(rows, nfes, index, "rmse")))
        path = os.path.join(out_dir, "metric_vs_nfe.png")
        plot_metric_vs_nfe(panels, path, "(see panel title)", xticks=sorted(nfes))
    return records


def _curves(rows, nfes, index, key) -> dict:
    curves = {}
    for row in rows:
        recs = [index[(row.label, n)] for n in nfes if (row.label, n) in index]
        recs = [r for r in recs if r.get(key) is not None]
        if recs:
            curves[row.label] = ([r["nfe"] for r in recs], [r[key] for r in recs])
    return curves
