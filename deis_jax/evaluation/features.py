"""The feature extractor and the reference statistics an evaluation config (``config.eval``)
asks for.

* :func:`validate_eval` -- the start-up checks of those ``config.eval`` fields;
  :func:`check_reference_stats` reads the statistics file (before any network is built).
* :func:`extractor_from_config` -- ``eval.metric='fid'``: the Inception network from the local
  weights file ``eval.inception_weights`` (never downloaded; optionally checked against
  ``eval.inception_sha256``); ``'fd_digits'``: the bundled digits classifier.
* :func:`sample_features` / :func:`sample_features_from_config` -- the same extractor as a
  differentiable function of model-space samples (``fid.sample_pixels``, unrounded, then the
  network with its own preprocessing): the feature space of the learned samplers' feature
  loss (``deis_jax.fitting.amed``, ``loss='features'``), with an identity for its fits.
* :class:`Reference` -- the statistics the samples are compared with: a stats file
  ``eval.reference_stats`` (pytorch-fid ``mu``/``sigma`` or score_sde ``pool_3``), or those of
  ``config.data`` split ``eval.reference_split`` (at most ``eval.reference_max_images``
  images), computed once and cached in ``<workdir>/tables/``. Loaded on first use; the
  reference *features* (for KID) only when asked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from deis_jax.common import checks as cv
from deis_jax.evaluation import digits_classifier, fid, inception
from deis_jax.evaluation.digits_classifier import DigitsClassifier
from deis_jax.evaluation.inception import (
    InceptionExtractor,
    InceptionWeightsError,
    weights_instructions,
)

METRICS = ("fid", "fd_digits")
FEATURE_DIMS = {"fid": inception.FEATURE_DIM, "fd_digits": digits_classifier.FEATURE_DIM}
METRIC_LABEL = {"fid": "FID", "fd_digits": "FD-digits"}
BOOL = (True, False)


def validate_eval(config) -> None:
    """Check the ``config.eval`` fields read here and by the table mode (``ConfigError``
    naming the field): metric, sample counts, optional scores, reference."""
    metric = cv.require_choice(config, "eval.metric", METRICS)
    n = cv.require_number(config, "eval.num_samples", integer=True, minimum=2)
    cv.require_number(config, "eval.batch_size", integer=True, minimum=1)
    cv.require_seed(config, "eval.seed")
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
    cv.require_number(config, "eval.reference_max_images", integer=True, minimum=2, allow_none=True)
    ref = cv.get_field(config, "eval.reference_stats")
    if ref is not None and not os.path.isfile(ref):
        raise cv.ConfigError(f"config.eval.reference_stats: no file at {ref!r}")
    shape = (config.data.name, config.data.image_size, config.data.num_channels)
    if metric == "fd_digits" and shape != ("digits", 16, 1):
        raise cv.ConfigError(
            f"config.eval.metric='fd_digits' needs config.data = digits at 16x16x1, got "
            f"{shape}; use metric 'fid' for other datasets"
        )
    path = cv.get_field(config, "eval.inception_weights") if metric == "fid" else None
    if metric == "fid" and not (path and os.path.isfile(path)):
        where = f"no file at {path!r}" if path else "it is not set"
        raise cv.ConfigError(
            f"config.eval.inception_weights: {where}. " + weights_instructions(path)
        ) from InceptionWeightsError(where)


def check_reference_stats(config) -> None:
    """``config.eval.reference_stats`` (when set) is a readable statistics file with the
    features of ``config.eval.metric`` (``fid.StatsFileError`` naming the field and the file
    otherwise): read as the run will read it, before any network is built."""
    path = config.eval.get("reference_stats")
    if not path:
        return
    try:
        mu, _, _ = fid.load_stats(path)
    except fid.StatsFileError as err:
        raise fid.StatsFileError(f"config.eval.reference_stats: {err}") from err
    metric = config.eval.metric
    if mu.shape[0] != FEATURE_DIMS[metric]:
        raise fid.StatsFileError(
            f"config.eval.reference_stats: {path!r} holds {mu.shape[0]}-d statistics, "
            f"metric {metric!r} gives {FEATURE_DIMS[metric]}-d features; pass the statistics "
            f"of that extractor"
        )


def extractor_from_config(config) -> fid.FeatureExtractor:
    """The feature extractor of ``config.eval.metric`` (see the module docstring)."""
    if config.eval.metric == "fd_digits":
        return DigitsClassifier.load()
    return InceptionExtractor.from_file(
        config.eval.inception_weights, config.eval.get("inception_sha256")
    )


@dataclasses.dataclass(frozen=True)
class _OnSamples:
    """``(*weights, x) -> network(*weights, fid.sample_pixels(x, centered))``: a value object,
    so that two feature functions of one extractor share their compiled programs."""

    network: Callable
    centered: bool

    def __call__(self, *args):
        *weights, x = args
        return self.network(*weights, fid.sample_pixels(x, self.centered))


class SampleFeatures(NamedTuple):
    """An extractor's features as a function of model-space samples: ``fn(x)`` (a
    ``jax.tree_util.Partial`` whose leaves are the network's weights, so a jitted caller takes
    them as arguments) and ``identity``, what names it in a fit's resumable state (the
    extractor, its weights' sha256 and the pixel mapping)."""

    fn: jax.tree_util.Partial
    identity: str


def sample_features(extractor, centered: bool) -> SampleFeatures:
    """``x -> extractor features`` of model-space samples ``x`` (NHWC, the data as the model
    sees it; ``centered``: ``config.data.centered``): the pixels the metric scores
    (``fid.sample_pixels``) without the rounding to uint8, through the network and its own
    preprocessing (``extractor.feature_fn()``), differentiable in ``x`` (zero gradient where
    the pixels are clipped)."""
    network = extractor.feature_fn()
    identity = json.dumps({"extractor": extractor.name, "weights_sha256": extractor.weights_sha256,
                           "pixels": "fid.sample_pixels", "centered": bool(centered)},
                          sort_keys=True)  # fmt: skip
    fn = jax.tree_util.Partial(_OnSamples(network.func, bool(centered)), *network.args)
    return SampleFeatures(fn, identity)


def sample_features_from_config(config) -> SampleFeatures:
    """:func:`sample_features` of ``config.eval.metric``'s extractor (the one FD / FID uses,
    :func:`extractor_from_config`) on ``config.data``'s centring."""
    return sample_features(extractor_from_config(config), bool(config.data.centered))


def reference_from_config(
    config, workdir: str, extractor: fid.FeatureExtractor, *, keep_features: bool = False
) -> dict[str, Any]:
    """``{'mu', 'sigma', 'n', 'source', 'stats'?, 'features'?}`` of the reference (see the
    module docstring); ``keep_features`` also returns every reference feature vector (not
    possible from a stats file)."""
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
    name = config.data.name.replace("/", "_")
    cache = os.path.join(workdir, "tables", f"reference_{extractor.name}_{name}_{split}.npz")
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


class Reference:
    """The reference statistics of ``config``, loaded (or computed) on first use.

    ``get()`` returns :func:`reference_from_config`'s dict; ``get(features=True)`` the same
    with the reference features (recomputed once if they were not kept)."""

    def __init__(self, config, workdir: str, extractor: fid.FeatureExtractor):
        self.config, self.workdir, self.extractor = config, workdir, extractor
        self._value: dict[str, Any] | None = None

    def get(self, features: bool = False) -> dict[str, Any]:
        if self._value is None or (features and "features" not in self._value):
            self._value = reference_from_config(
                self.config, self.workdir, self.extractor, keep_features=features
            )
        return self._value
