"""Distribution metrics from a feature extractor: FID / FD, Inception Score, KID.

Everything here is extractor-agnostic: a *feature extractor* is any object with

    name: str                 # e.g. "inception_v3_pt_2015_12_05", "digits_classifier"
    weights_sha256: str       # identity of its weights (part of every cache key)
    feature_dim: int          # e.g. 2048 (Inception pool_3), 64 (digits classifier)
    num_classes: int          # logits width, e.g. 1008 (Inception), 10 (digits)
    features_and_logits(images) -> (features (B, feature_dim), logits (B, num_classes))

taking NHWC images with values in [0, 255] (uint8, or float already quantised). A sampler's
model-space output becomes those images in one place, :func:`sample_pixels` (the data's
centring undone, clipped, times 255), which the metric rounds to uint8 (:func:`sample_images`)
and the feature loss of the learned samplers (``deis_jax.evaluation.features.sample_features``)
feeds unrounded, so that it is differentiable. FID is
``frechet_distance`` of the statistics of the Inception extractor
(``deis_jax.evaluation.inception``); "FD-digits" is the same code with the digits classifier
(``deis_jax.evaluation.digits_classifier``).

Streaming statistics (``FeatureStats``): the count ``n``, the sum ``s = sum_i f_i`` and the sum
of outer products ``S = sum_i f_i f_i^T`` accumulate in float64. They are plain sums, so they
combine by addition in any order: per batch (``update``), per device (``moments`` under ``jit``
on a batch sharded over devices reduces across them), per host (``merge`` /
``allgather_stats``). Mean ``s/n`` and the unbiased covariance ``(S - n mu mu^T)/(n - 1)`` equal
``np.mean`` / ``np.cov(rowvar=False)`` of the concatenated features.

The Frechet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` is computed on the host in
float64 with ``scipy.linalg.sqrtm``; when the product is singular (the square root is not finite)
``eps I`` is added to both covariances and it is retried -- the standard pytorch-fid fallback --
and a small imaginary part (numerical noise) is dropped, a large one is an error.
``frechet_distance_eigh`` is the symmetric form ``tr((S1^(1/2) S2 S1^(1/2))^(1/2))`` via ``eigh``
(no Schur decomposition; it agrees with the ``sqrtm`` form to ~1e-10 relative in float64).

Statistics files (``load_stats`` / ``save_stats``), ``.npz``:

* pytorch-fid and OpenAI's guided-diffusion reference batches: keys ``mu`` (D,) and ``sigma``
  (D, D) (other keys ignored);
* score_sde (``assets/stats/cifar10_stats.npz``): key ``pool_3`` -- the raw (N, 2048)
  activations of all training images; mean and ``np.cov`` are taken here (``logits``, if
  present, is ignored);
* this project (``save_stats``): ``mu``, ``sigma`` (so pytorch-fid reads it too) plus ``n``,
  ``sum``, ``sum_outer`` (the exact streaming sums, mergeable) and string metadata
  (``extractor``, ``weights_sha256``, ``dataset``, ``split``, ...).
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from absl import logging
from jax.experimental import multihost_utils

from deis_jax.common import data
from deis_jax.common.files import atomic_write_bytes, move_aside


class FeatureExtractor(Protocol):
    name: str
    weights_sha256: str
    feature_dim: int
    num_classes: int

    def features_and_logits(self, images) -> tuple[Any, Any]: ...


# --------------------------------------------------------------------------------------------
# streaming statistics


def moments(features: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(n, sum, sum of outer products)`` of a (B, D) batch, in the batch's dtype.

    Jittable; on a batch sharded over devices XLA computes per-device partial sums and
    all-reduces them. Accumulate the results across batches in float64 with
    ``FeatureStats.add_moments``.
    """
    f = jnp.asarray(features).reshape(features.shape[0], -1)
    return (
        jnp.asarray(f.shape[0], jnp.int32),
        jnp.sum(f, axis=0),
        jnp.einsum("bi,bj->ij", f, f, precision=jax.lax.Precision.HIGHEST),
    )


@dataclasses.dataclass
class FeatureStats:
    """Streaming float64 sums of features; combine with ``merge`` (or ``+``)."""

    n: int
    sum: np.ndarray  # (D,) float64
    sum_outer: np.ndarray  # (D, D) float64

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def from_features(cls, features) -> FeatureStats:
        f = np.asarray(features, np.float64)
        return cls.empty(f.reshape(len(f), -1).shape[1]).update(f)

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    def update(self, features) -> FeatureStats:
        """Add a (B, D) batch (converted to float64 on the host first). Returns self."""
        f = np.asarray(features, np.float64)
        f = f.reshape(len(f), -1)
        if f.shape[1] != self.dim:
            raise ValueError(f"features have dimension {f.shape[1]}, the stats {self.dim}")
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.sum_outer += f.T @ f
        return self

    def add_moments(self, n, s, ss) -> FeatureStats:
        """Add the output of ``moments`` (device arrays fine). Returns self."""
        self.n += int(n)
        self.sum += np.asarray(s, np.float64)
        self.sum_outer += np.asarray(ss, np.float64)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """The statistics of the union of both sample sets (a new object)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dimension {self.dim} and {other.dim}")
        return FeatureStats(
            self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer
        )

    __add__ = merge

    @property
    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("no samples accumulated")
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (``np.cov(rowvar=False)``, normalised by n - 1)."""
        if self.n < 2:
            raise ValueError(f"the covariance needs at least 2 samples, got {self.n}")
        mu = self.mean
        cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return 0.5 * (cov + cov.T)


def _allgather_sum(tree: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each leaf summed over the processes (in the leaf's own dtype), on every process."""
    gathered = multihost_utils.process_allgather(tree)  # leading axis = process
    return {
        k: np.sum(np.asarray(gathered[k], np.asarray(v).dtype), axis=0) for k, v in tree.items()
    }


def allgather_stats(stats: FeatureStats) -> FeatureStats:
    """Merge the per-process statistics of all hosts (identity with one process)."""
    if jax.process_count() == 1:
        return stats
    tree = {"n": np.asarray(stats.n, np.int64), "sum": stats.sum, "sum_outer": stats.sum_outer}
    total = _allgather_sum(tree)
    return FeatureStats(int(total["n"]), total["sum"], total["sum_outer"])


def allgather_is_stats(stats: ISStats) -> ISStats:
    """Merge the per-process Inception-Score statistics of all hosts (identity with one
    process); every process must have the same ``total`` and ``splits``."""
    if jax.process_count() == 1:
        return stats
    total = _allgather_sum(
        {"count": stats.count, "sum_p": stats.sum_p, "sum_plogp": stats.sum_plogp}
    )
    return ISStats(stats.total, stats.splits, total["count"], total["sum_p"], total["sum_plogp"])


# --------------------------------------------------------------------------------------------
# Frechet distance


def _as_stats(mu, sigma) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, np.float64))
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mean {mu.shape} and covariance {sigma.shape} do not match")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), host float64."""
    mu1, sigma1 = _as_stats(mu1, sigma1)
    mu2, sigma2 = _as_stats(mu2, sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"statistics of different dimension: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        warnings.warn(
            f"frechet_distance: singular product of covariances; adding {eps} I to both",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = eps * np.eye(mu1.shape[0])
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        scale = max(1.0, float(np.max(np.abs(np.diagonal(covmean).real))))
        if imag > 1e-3 * scale:
            raise ValueError(f"frechet_distance: sqrtm has a large imaginary part ({imag:.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_eigh(mu1, sigma1, mu2, sigma2) -> float:
    """The same distance via ``tr((S1^(1/2) S2 S1^(1/2))^(1/2))`` (symmetric, eigh only)."""
    mu1, sigma1 = _as_stats(mu1, sigma1)
    mu2, sigma2 = _as_stats(mu2, sigma2)
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    w = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    diff = mu1 - mu2
    tr_covmean = float(np.sum(np.sqrt(np.clip(w, 0.0, None))))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fd_from_stats(a: FeatureStats, b: FeatureStats | tuple) -> float:
    """Frechet distance between two ``FeatureStats`` (``b`` may be a ``(mu, sigma)`` pair)."""
    mu2, s2 = (b.mean, b.cov) if isinstance(b, FeatureStats) else b
    return frechet_distance(a.mean, a.cov, mu2, s2)


# --------------------------------------------------------------------------------------------
# Inception Score


def _log_softmax64(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split of consecutive samples: (mean, std).

    ``p(y|x) = softmax(logits)`` over all classes (1008 for the TF/pytorch-fid Inception, as
    in the original implementation). Splits are ``np.array_split`` chunks of the sample order.
    """
    logp = _log_softmax64(logits)
    scores = []
    for chunk in np.array_split(logp, splits):
        p = np.exp(chunk)
        log_marginal = np.log(np.mean(p, axis=0))
        kl = np.sum(p * (chunk - log_marginal), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


@dataclasses.dataclass
class ISStats:
    """Streaming Inception Score: per split, the count, sum p(y|x) and sum_x sum_y p log p.

    Sample ``i`` (global index) of ``total`` belongs to split ``i * splits // total``: the
    same consecutive chunks as ``np.array_split`` of the whole sample when ``splits``
    divides ``total``. Combine with ``merge``.
    """

    total: int
    splits: int
    count: np.ndarray  # (splits,)
    sum_p: np.ndarray  # (splits, C)
    sum_plogp: np.ndarray  # (splits,)

    @classmethod
    def empty(cls, num_classes: int, total: int, splits: int = 10) -> ISStats:
        if total < splits:
            raise ValueError(f"inception score needs total >= splits, got {total} < {splits}")
        return cls(
            total,
            splits,
            np.zeros(splits, np.int64),
            np.zeros((splits, num_classes), np.float64),
            np.zeros(splits, np.float64),
        )

    def update(self, logits, indices) -> ISStats:
        logp = _log_softmax64(logits)
        p = np.exp(logp)
        idx = np.asarray(indices, np.int64)
        if np.any(idx < 0) or np.any(idx >= self.total):
            raise ValueError(f"sample indices must lie in [0, {self.total})")
        split = idx * self.splits // self.total
        np.add.at(self.count, split, 1)
        np.add.at(self.sum_p, split, p)
        np.add.at(self.sum_plogp, split, np.sum(p * logp, axis=1))
        return self

    def merge(self, other: ISStats) -> ISStats:
        return ISStats(
            self.total,
            self.splits,
            self.count + other.count,
            self.sum_p + other.sum_p,
            self.sum_plogp + other.sum_plogp,
        )

    def result(self) -> tuple[float, float]:
        if np.any(self.count == 0):
            raise ValueError("some inception-score split received no samples")
        n = self.count.astype(np.float64)
        marginal = self.sum_p / n[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = np.sum(np.where(marginal > 0, marginal * np.log(marginal), 0.0), axis=1)
        scores = np.exp(self.sum_plogp / n - ent)
        return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------
# KID


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kernel_inception_distance(
    features_a, features_b, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the kernel ``(x.y/d + 1)^3``, averaged over random subsets.

    Each of ``num_subsets`` draws takes ``min(subset_size, len(a), len(b))`` samples without
    replacement from each set (Binkowski et al. 2018). Returns (mean, std) over subsets.
    """
    a = np.asarray(features_a, np.float64).reshape(len(features_a), -1)
    b = np.asarray(features_b, np.float64).reshape(len(features_b), -1)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    values = [
        _poly_mmd2(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


# --------------------------------------------------------------------------------------------
# statistics files and reference statistics


def save_stats(path: str, stats: FeatureStats, **metadata: Any) -> None:
    """Write ``mu``, ``sigma`` (pytorch-fid compatible), the exact sums and string metadata."""
    buf = io.BytesIO()
    meta = {k: np.asarray(str(v)) for k, v in metadata.items()}
    np.savez(
        buf,
        mu=stats.mean,
        sigma=stats.cov,
        n=np.asarray(stats.n, np.int64),
        sum=stats.sum,
        sum_outer=stats.sum_outer,
        **meta,
    )
    atomic_write_bytes(path, buf.getvalue())


class StatsFileError(ValueError):
    """A statistics file that cannot be read (torn, garbled) or holds no usable statistics."""


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """``(mu, sigma, metadata)`` from a pytorch-fid / OpenAI (``mu``, ``sigma``), score_sde
    (``pool_3`` activations) or ``save_stats`` file (see the module docstring).

    ``FileNotFoundError`` when there is no file; ``StatsFileError`` naming the file when it
    is not a readable ``.npz`` (torn or garbled: the zip's CRC-32 of every array is checked as
    it is read), lacks the arrays, or holds statistics that are not finite or do not fit
    together."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"statistics file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as err:  # zipfile, numpy header and EOF errors of a damaged file
        raise StatsFileError(
            f"statistics file {path!r} is damaged or not a .npz ({type(err).__name__}: {err}); "
            f"replace it (download or compute it again)"
        ) from err
    meta = {k: str(v) for k, v in arrays.items() if v.dtype.kind == "U" and v.ndim == 0}
    if {"mu", "sigma"} <= set(arrays):
        mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
    elif "pool_3" in arrays:
        acts = np.asarray(arrays["pool_3"], np.float64).reshape(len(arrays["pool_3"]), -1)
        meta.setdefault("source", "score_sde pool_3 activations")
        mu, sigma = acts.mean(axis=0), np.cov(acts, rowvar=False)
    else:
        raise StatsFileError(
            f"{path!r} has neither 'mu'/'sigma' (pytorch-fid, OpenAI) nor 'pool_3' (score_sde) "
            f"arrays; it has {sorted(arrays)}"
        )
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise StatsFileError(f"{path!r}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise StatsFileError(f"{path!r} holds non-finite statistics; replace it")
    return mu, sigma, meta


def load_feature_stats(path: str) -> FeatureStats | None:
    """The exact streaming sums of a ``save_stats`` file (None for other formats;
    ``StatsFileError`` for a damaged file, see :func:`load_stats`)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if not {"n", "sum", "sum_outer"} <= set(f.files):
                return None
            return FeatureStats(int(f["n"]), np.array(f["sum"]), np.array(f["sum_outer"]))
    except Exception as err:
        raise StatsFileError(f"statistics file {path!r} is damaged ({type(err).__name__})") from err


def sample_pixels(x, centered: bool):
    """Model-space samples (NHWC) -> pixel values in [0, 255], unrounded floats: the data's
    centring undone and clipped to [0, 1] (``deis_jax.common.data.postprocess``), times 255.
    numpy in, numpy out; a jax array (also traced) in, a jax array out, differentiable (zero
    gradient where clipped). Every extractor takes these pixels: rounded to uint8 by the metric
    (:func:`sample_images`), unrounded in the feature loss (differentiable)."""
    return data.postprocess(x, centered) * 255.0


def sample_images(x, centered: bool) -> np.ndarray:
    """The uint8 images the metric scores of model-space samples ``x`` (host arrays):
    :func:`sample_pixels` rounded to the nearest level (non-finite values read as 0)."""
    pixels = sample_pixels(np.nan_to_num(np.asarray(x)), centered)
    return np.round(pixels).astype(np.uint8)


def stats_of_images(
    extractor: FeatureExtractor,
    batches: Iterable[np.ndarray],
    *,
    with_logits: bool = False,
    keep_features: bool = False,
) -> dict[str, Any]:
    """Run ``extractor`` over uint8 NHWC ``batches``: ``{'stats', 'logits'?, 'features'?}``."""
    stats = FeatureStats.empty(extractor.feature_dim)
    logits, feats = [], []
    for batch in batches:
        f, lg = extractor.features_and_logits(batch)
        f = np.asarray(jax.device_get(f), np.float64)
        stats.update(f)
        if with_logits:
            logits.append(np.asarray(jax.device_get(lg), np.float32))
        if keep_features:
            feats.append(f.astype(np.float32))
    out: dict[str, Any] = {"stats": stats}
    if with_logits:
        out["logits"] = np.concatenate(logits) if logits else np.zeros((0, extractor.num_classes))
    if keep_features:
        out["features"] = np.concatenate(feats) if feats else np.zeros((0, extractor.feature_dim))
    return out


def dataset_image_batches(
    data_config: Mapping | Any,
    split: str = "train",
    batch_size: int = 500,
    max_images: int | None = None,
    source=None,
):
    """uint8 NHWC batches of a dataset's images, preprocessed as for training but without
    flips or dequantisation (``deis_jax.common.data.to_unit_float``: crop / resize to the model's
    ``image_size``), in dataset order. ``source`` overrides ``data.get_source``."""
    src = data.get_source(data_config, split) if source is None else source
    total = len(src) if max_images is None else min(len(src), int(max_images))
    size = int(data_config.image_size)
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        imgs = [
            data.to_unit_float(src[i]["image"], data_config.name, size) for i in range(start, stop)
        ]
        yield np.round(np.stack(imgs) * 255.0).astype(np.uint8)


def _cached_stats(cache_path: str, meta: dict[str, Any]) -> FeatureStats | None:
    """The statistics cached at ``cache_path`` when its metadata is ``meta``; None (rebuild)
    otherwise. A damaged cache is moved aside (``<path>.damaged-<UTC time>``) with a warning
    naming it."""
    try:
        _, _, cached = load_stats(cache_path)
        stats = load_feature_stats(cache_path)
    except StatsFileError as err:
        moved = move_aside(cache_path, "damaged")
        logging.warning("%s; moved aside to %s, computing the statistics again", err, moved)
        return None
    if stats is None or any(cached.get(k) != str(v) for k, v in meta.items()):
        return None
    return stats


def reference_stats(
    extractor: FeatureExtractor,
    data_config,
    *,
    split: str = "train",
    batch_size: int = 500,
    max_images: int | None = None,
    cache_path: str | None = None,
    keep_features: bool = False,
    source=None,
) -> dict[str, Any]:
    """Statistics of a dataset (``config.data``) under ``extractor``, cached at ``cache_path``.

    The cache is reused only when its metadata (extractor, weights hash, dataset, split,
    image size, image count) matches; a damaged cache is moved aside and rebuilt. Returns
    ``{'stats', 'mu', 'sigma', 'features'?}``.
    """
    meta = {
        "extractor": extractor.name,
        "weights_sha256": extractor.weights_sha256,
        "dataset": data_config.name,
        "split": split,
        "image_size": int(data_config.image_size),
        "max_images": max_images,
        "preprocess": "deis_jax.common.data.to_unit_float -> uint8",
    }
    if cache_path and os.path.exists(cache_path) and not keep_features:
        stats = _cached_stats(cache_path, meta)
        if stats is not None:
            return {"stats": stats, "mu": stats.mean, "sigma": stats.cov}
    batches = dataset_image_batches(data_config, split, batch_size, max_images, source=source)
    out = stats_of_images(extractor, batches, keep_features=keep_features)
    stats = out["stats"]
    if cache_path:
        save_stats(cache_path, stats, **meta)
    out.update(mu=stats.mean, sigma=stats.cov)
    return out
