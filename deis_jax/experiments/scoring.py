"""Score a sampler on a network: draw samples, featurise them, compare with a reference.

    scorer = SampleScorer(ScoreSettings(num_samples=1000, batch_size=250, seed=0), schedule,
                          model, extractor, reference, image_shape=(32, 32, 3), centered=True)
    scorer = SampleScorer.from_config(config, schedule, model, extractor, reference)  # or
    record = scorer.score(sampler)   # {"value": FD, "num_samples", "is_mean", "rmse", ...}

Every call draws ``num_samples`` images (:class:`ScoreSettings`, ``config.eval``'s fields)
through the one sharded generation path
(``deis_jax.sampling.sharded.make_generate_fn`` with ``sharded.sample_keys(seed)``):
sample ``i`` starts from ``x_T = prior(fold_in(prior_key, i))`` and a stochastic sampler's noise is
keyed by ``i`` too (a class-conditional network's class as well: ``config.sampling.labels``
with seed ``config.eval.seed``), so every sampler sees the same x_T and calls differ only by
the sampler.
The network parameters are jit arguments. The images are quantised to uint8 as a saved image
would be and streamed through the feature extractor (``fid.FeatureStats``); the record holds

* ``value`` -- the Frechet distance to the reference statistics (FID / FD-digits);
* ``is_mean``, ``is_std`` -- Inception Score from the extractor's logits
  (``config.eval.inception_score``, ``is_splits`` splits);
* ``kid_mean``, ``kid_std`` -- KID (``config.eval.kid``; keeps the features in memory);
* ``rmse``, ``rmse_reference_error`` -- deterministic samplers, ``config.eval.rmse``: RMSE of
  the first ``rmse_num_samples`` samples against a reference ODE solve from the same x_T
  (RK4 with ``rmse_reference_steps`` steps, validated by step doubling; solved once);
* ``num_samples``, ``nonfinite_samples``, ``seconds``.

When any sample is not finite (``deis_jax.sampling.diagnostics.nonfinite_samples``, counted over
every process) the record is a failure, not a result: ``failed`` says how many samples (and
the first indices) and every metric is None.

Several processes: each process generates every ``process_count``-th batch on its own devices
and the feature (and IS) statistics are all-gathered before the distance is taken.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from deis_jax.common import data, parallel
from deis_jax.evaluation import features, fid
from deis_jax.evaluation.discretization import reference_output
from deis_jax.evaluation.features import Reference
from deis_jax.evaluation.metrics import rmse
from deis_jax.evaluation.reference import ReferenceSolve, reference_solve
from deis_jax.experiments.engine import SHOWN, nonfinite_reason
from deis_jax.models.loading import LoadedModel, class_labels_of, image_shape
from deis_jax.sampling import sharded
from deis_jax.sampling.class_labels import ClassLabels
from deis_jax.sampling.diagnostics import nonfinite_samples
from deis_jax.sampling.sampler import Sampler
from deis_jax.sampling.sde import NoiseSchedule


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    """What :class:`SampleScorer` draws and measures (``config.eval``'s fields, as plain
    values): ``num_samples`` images in batches of ``batch_size`` keyed by ``seed``; the
    Inception Score in ``is_splits`` splits, KID with ``kid_subsets`` subsets of
    ``kid_subset_size``, and the RMSE of the first ``rmse_num_samples`` samples against an
    RK4 reference solve of ``rmse_reference_steps`` steps, each when switched on."""

    num_samples: int
    batch_size: int
    seed: int
    inception_score: bool = False
    is_splits: int = 0
    kid: bool = False
    kid_subsets: int = 0
    kid_subset_size: int = 0
    rmse: bool = False
    rmse_num_samples: int = 0
    rmse_reference_steps: int = 0

    @classmethod
    def from_eval(cls, ev) -> ScoreSettings:
        """The settings of a ``config.eval`` block (fields of a metric that is off are not
        read)."""
        return cls(
            num_samples=int(ev.num_samples),
            batch_size=int(ev.batch_size),
            seed=int(ev.seed),
            inception_score=bool(ev.inception_score),
            is_splits=int(ev.is_splits) if ev.inception_score else 0,
            kid=bool(ev.kid),
            kid_subsets=int(ev.kid_subsets) if ev.kid else 0,
            kid_subset_size=int(ev.kid_subset_size) if ev.kid else 0,
            rmse=bool(ev.rmse),
            rmse_num_samples=int(ev.rmse_num_samples) if ev.rmse else 0,
            rmse_reference_steps=int(ev.rmse_reference_steps) if ev.rmse else 0,
        )


class SampleScorer:
    """Samples, featurises and scores samplers (see the module docstring).

    ``image_shape`` is ``(H, W, C)``; ``centered``: the network's data are in [-1, 1] (else
    [0, 1]); ``t0`` / ``t1`` the interval of the RMSE reference solve (None: the schedule's);
    ``labels`` the classes of a class-conditional network's samples (None: unconditional).
    :meth:`from_config` reads all of these from an experiment config."""

    def __init__(
        self,
        settings: ScoreSettings,
        schedule: NoiseSchedule,
        model: LoadedModel,
        extractor: fid.FeatureExtractor,
        reference: Reference,
        *,
        image_shape: tuple[int, int, int],
        centered: bool,
        t0: float | None = None,
        t1: float | None = None,
        labels: ClassLabels | None = None,
    ):
        self.settings, self.schedule, self.model = settings, schedule, model
        self.extractor, self.reference = extractor, reference
        self.centered, self.t0, self.t1 = centered, t0, t1
        self.mesh = parallel.make_mesh(jax.local_devices())
        self.n = settings.num_samples
        self.batch = math.ceil(settings.batch_size / self.mesh.size) * self.mesh.size
        self.shape = tuple(image_shape)
        self.keys = sharded.sample_keys(settings.seed)
        self.labels = labels  # a class-conditional network: the class of sample i
        self._params = parallel.replicate(model.params, self.mesh)  # once, not per sampler
        self._keys = parallel.replicate(self.keys, self.mesh)
        self._rmse_ref: ReferenceSolve | None = None

    @classmethod
    def from_config(
        cls,
        config,
        schedule: NoiseSchedule,
        model: LoadedModel,
        extractor: fid.FeatureExtractor,
        reference: Reference,
    ) -> SampleScorer:
        """The scorer of an experiment config: ``config.eval`` (:class:`ScoreSettings`),
        ``config.data`` (shape, centring), ``config.sampler.t0`` / ``t1`` and, for a
        class-conditional network, ``config.sampling.labels`` keyed by ``eval.seed``."""
        settings = ScoreSettings.from_eval(config.eval)
        return cls(
            settings, schedule, model, extractor, reference,
            image_shape=image_shape(config), centered=bool(config.data.centered),
            t0=config.sampler.t0, t1=config.sampler.t1,
            labels=class_labels_of(config, model, settings.seed),
        )  # fmt: skip

    def batches(self) -> list[int]:
        """Offsets of this process's batches (strided over processes)."""
        offsets = list(range(0, self.n, self.batch))
        return offsets[jax.process_index() :: jax.process_count()]

    def rmse_reference(self) -> ReferenceSolve:
        """Reference-solve endpoints of the first ``rmse_num_samples`` x_T (solved once)."""
        if self._rmse_ref is None:
            ev = self.settings
            t0, t1 = self.schedule.interval(self.t0, self.t1)
            x_T = sharded.prior_draws(
                lambda key: self.schedule.prior_sample(key, self.shape),
                self.keys[0],
                jnp.arange(ev.rmse_num_samples),
            )
            self._rmse_ref = reference_solve(
                self.schedule, self.model.eps_fn(self._labels_of(len(x_T))), x_T, t0=t0, t1=t1,
                steps=ev.rmse_reference_steps,
            )  # fmt: skip
            logging.info(
                "reference solve: %d NFE, error estimate %.2e",
                self._rmse_ref.nfe, self._rmse_ref.error_estimate,
            )  # fmt: skip
        return self._rmse_ref

    def _labels_of(self, count: int) -> jax.Array | None:
        """The classes of samples ``0 .. count - 1`` (None: an unconditional network)."""
        return None if self.labels is None else self.labels(jnp.arange(count))

    def score(self, sampler: Sampler, advance: Callable[[float], None] | None = None) -> dict:
        """The record of ``sampler`` (see the module docstring); ``advance(k)`` is called
        with the NFE x samples of every finished batch."""
        ev = self.settings
        start = time.perf_counter()
        generate = sharded.make_generate_fn(
            sampler, self.mesh, self.shape, bind=self.model.bind, labels=self.labels
        )
        params, (prior_key, noise_key) = self._params, self._keys
        stats = fid.FeatureStats.empty(self.extractor.feature_dim)
        is_stats = None
        if ev.inception_score:
            is_stats = fid.ISStats.empty(self.extractor.num_classes, self.n, ev.is_splits)
        feats, rmse_out = [], []
        m = ev.rmse_num_samples if (ev.rmse and not sampler.stochastic) else 0
        nonfinite: list[int] = []  # global indices of non-finite samples (this process)
        for offset in self.batches():
            indices = np.arange(offset, offset + self.batch, dtype=np.int32)
            x, _ = generate(params, prior_key, noise_key, parallel.shard_batch(indices, self.mesh))
            count = min(self.batch, self.n - offset)
            x = np.asarray(jax.device_get(x))[:count]
            nonfinite += [offset + int(i) for i in nonfinite_samples(x)]
            if offset < m:
                rmse_out.append(x[: m - offset].astype(np.float64))
            images = fid.sample_images(x, self.centered)
            f, logits = self.extractor.features_and_logits(images)
            f = np.asarray(jax.device_get(f), np.float64)
            stats.update(f)
            if is_stats is not None:
                is_stats.update(np.asarray(jax.device_get(logits)), offset + np.arange(count))
            if ev.kid:
                feats.append(f.astype(np.float32))
            if advance is not None:
                advance(count * sampler.nfe)
        stats = fid.allgather_stats(stats)
        count, shown = _gather_indices(nonfinite)
        record: dict[str, Any] = {"num_samples": stats.n, "nonfinite_samples": count}
        if count:
            record.update(value=None, failed=nonfinite_reason(shown, stats.n, count))
            record["seconds"] = time.perf_counter() - start
            logging.warning("%s: %s", sampler.method, record["failed"])
            return record
        reference = self.reference.get(features=bool(ev.kid))
        record["value"] = fid.frechet_distance(
            stats.mean, stats.cov, reference["mu"], reference["sigma"]
        )
        if is_stats is not None:
            record["is_mean"], record["is_std"] = fid.allgather_is_stats(is_stats).result()
        if ev.kid:
            record["kid_mean"], record["kid_std"] = fid.kernel_inception_distance(
                np.concatenate(feats),
                reference["features"],
                ev.kid_subsets,
                ev.kid_subset_size,
                seed=ev.seed,
            )
        if m:
            ref = self.rmse_reference()
            bound = dataclasses.replace(sampler, eps_fn=self.model.eps_fn())
            want = reference_output(bound, ref, self._labels_of(m))
            record["rmse"] = rmse(np.concatenate(rmse_out)[:m], want)
            record["rmse_reference_error"] = ref.error_estimate
        record["seconds"] = time.perf_counter() - start
        return record


def _gather_indices(indices: list[int]) -> tuple[int, list[int]]:
    """``(count over every process, the smallest SHOWN of the processes' indices)``."""
    head = (sorted(indices) + [-1] * SHOWN)[:SHOWN]
    gathered = parallel.allgather_ints([len(indices), *head])
    shown = sorted(int(i) for i in gathered[:, 1:].ravel() if i >= 0)[:SHOWN]
    return int(gathered[:, 0].sum()), shown


def check_reference(config, workdir: str) -> None:
    """The FID reference (``config.eval``) can be had: a statistics file (read by
    ``features.check_reference_stats``), the embedded digits, statistics cached in
    ``<workdir>/tables/`` (not for KID, which needs the features), or else the data split
    ``eval.reference_split`` (``DatasetNotFoundError`` saying how to prepare it)."""
    ev, name = config.eval, config.data.name
    if ev.get("reference_stats"):
        features.check_reference_stats(config)
        return
    if name in data.EMBEDDED_DATASETS:
        return
    cache = f"reference_*_{name.replace('/', '_')}_{ev.reference_split}.npz"
    if ev.kid or not glob.glob(os.path.join(workdir, "tables", cache)):
        data.get_source(config.data, ev.reference_split)
