"""The FID Inception-v3 in Flax: pytorch-fid's port of TensorFlow's 2015-12-05 Inception graph.

FID numbers are only comparable when they come from *the* FID network: the TF Inception-v3 of
2015-12-05 (``pool_3`` features, 2048-d; 1008-way ``logits`` for the Inception Score). This
module reimplements the layer structure of pytorch-fid's ``FIDInceptionV3`` -- torchvision's
Inception-v3 with the FID variants of the A/C/E blocks -- and loads its weights.

Network (NHWC; every conv is ``BasicConv`` = conv without bias, BatchNorm eps 1e-3, ReLU)::

    input  [0, 255] -> x/255 -> bilinear resize to 299x299 (half-pixel centres, no
           anti-aliasing: torch ``F.interpolate(..., 'bilinear', align_corners=False)``)
           -> 2x - 1 ([-1, 1]); greyscale inputs are repeated to 3 channels
    stem   Conv2d_1a_3x3 (32, s2) Conv2d_2a_3x3 (32) Conv2d_2b_3x3 (64, pad 1) maxpool 3/2
           Conv2d_3b_1x1 (80) Conv2d_4a_3x3 (192) maxpool 3/2                  -> 35x35x192
    Mixed_5b/5c/5d  A (pool features 32, 64, 64)                               -> 35x35x288
    Mixed_6a        B                                                          -> 17x17x768
    Mixed_6b..6e    C (channels_7x7 128, 160, 160, 192)                        -> 17x17x768
    Mixed_7a        D                                                          -> 8x8x1280
    Mixed_7b        E, branch_pool = avg pool                                  -> 8x8x2048
    Mixed_7c        E, branch_pool = **max** pool                              -> 8x8x2048
    pool_3          global average                                             -> 2048
    fc              logits                                                     -> 1008

The FID variants differ from torchvision's blocks in that their 3x3 average pools exclude the
padding from the average (``count_include_pad=False``), and Mixed_7c pools with max instead of
average -- both are what the TF graph computes. Any input size works (it is resized to 299;
``InceptionV3(resize=...)`` lets tests use smaller inputs -- at least 75x75, the smallest size
the valid-padded stem and reductions accept).

Weights: only from a local file, never downloaded. The source is pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (95,628,359 bytes, sha256 ``PT_INCEPTION_SHA256``;
the same file torch-fidelity ships as ``weights-inception-2015-12-05-6726825d.pth``). Because
reading a ``.pth`` needs torch, it is converted once, on any machine with torch::

    python -m deis_jax.evaluation.inception convert pt_inception-2015-12-05-6726825d.pth \
        checkpoints/inception/pt_inception-2015-12-05.npz

The converter refuses a source whose sha256 is not ``PT_INCEPTION_SHA256``. The converted
``.npz`` (documented layout, "deis_jax-inception-v1"):

* one array per pytorch state-dict entry, under its pytorch name and in pytorch layout
  (``<block>.conv.weight`` OIHW, ``<block>.bn.{weight,bias,running_mean,running_var}``,
  ``fc.weight`` (1008, 2048), ``fc.bias``), float32; ``num_batches_tracked`` entries dropped
  (94 convs x 5 + 2 = 472 arrays);
* ``_format`` = "deis_jax-inception-v1", ``_source_sha256`` = the sha256 of the ``.pth`` it was
  converted from, ``_content_sha256`` = sha256 of the arrays (``content_sha256``: sorted names,
  dtype, shape and bytes).

``load_inception_variables(path, sha256=None)`` accepts the converted ``.npz`` (checks the
format, that ``_source_sha256`` is the pinned ``PT_INCEPTION_SHA256``, that the recomputed
content digest matches ``_content_sha256``, every name and shape, and, when ``sha256`` is
given -- ``config.eval.inception_sha256`` -- the file's own sha256) or, when torch is
installed, the ``.pth`` itself (checked against ``PT_INCEPTION_SHA256``). Anything else is a
``InceptionWeightsError`` saying what to download, where to put it and how to convert it.
"""

from __future__ import annotations

import functools
import io
import os
import sys
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.common.files import atomic_write_bytes, sha256_file
from deis_jax.common.identity import arrays_digest

PT_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
PT_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PT_INCEPTION_BYTES = 95_628_359
CONVERTED_FORMAT = "deis_jax-inception-v1"
DEFAULT_WEIGHTS_PATH = "checkpoints/inception/pt_inception-2015-12-05.npz"
FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights file is missing, unreadable or not the pinned FID network."""


def weights_instructions(path: str | None) -> str:
    target = path or DEFAULT_WEIGHTS_PATH
    return (
        f"FID needs the weights of the FID Inception network (TF 2015-12-05, pytorch-fid "
        f"port); nothing is downloaded at run time. Download\n    {PT_INCEPTION_URL}\n"
        f"({PT_INCEPTION_BYTES} bytes, sha256 {PT_INCEPTION_SHA256}), convert it once on any "
        f"machine with torch (pip install torch):\n"
        f"    python -m deis_jax.evaluation.inception convert "
        f"pt_inception-2015-12-05-6726825d.pth {target}\n"
        f"and set config.eval.inception_weights={target} (see docs/evaluation.md)."
    )


# --------------------------------------------------------------------------------------------
# the network


class BasicConv(nn.Module):
    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg3(x):
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x):
    return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)


class InceptionE(nn.Module):
    pool: str  # "avg" (Mixed_7b, FIDInceptionE_1) or "max" (Mixed_7c, FIDInceptionE_2)

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg3(x)
        else:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID Inception-v3: images in [0, 255] (NHWC) -> (pool_3 features, logits)."""

    resize: int | None = INPUT_SIZE

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images, jnp.float32) / 255.0
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        if x.shape[-1] != 3:
            raise ValueError(f"images must have 1 or 3 channels, got shape {x.shape}")
        if self.resize is not None and x.shape[1:3] != (self.resize, self.resize):
            shape = (x.shape[0], self.resize, self.resize, 3)
            x = jax.image.resize(x, shape, method="bilinear", antialias=False)
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"Inception-v3 needs inputs of at least {MIN_INPUT_SIZE}x75")
        x = 2.0 * x - 1.0
        x = BasicConv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max3s2(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max3s2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        features = jnp.mean(x, axis=(1, 2))  # pool_3
        logits = nn.Dense(NUM_CLASSES, name="fc")(features)
        return features, logits


# --------------------------------------------------------------------------------------------
# parameter layout: Flax variables <-> pytorch state dict


_BN = {"weight": ("params", "scale"), "bias": ("params", "bias")}
_BN_STATS = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


@functools.lru_cache(maxsize=1)
def variable_shapes() -> dict[str, Any]:
    """Shapes of the Flax variables (``eval_shape``: nothing is computed)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), x)


def _flax_leaves(variables) -> dict[tuple[str, ...], Any]:
    flat = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
            flat[(collection,) + tuple(k.key for k in path)] = leaf
    return flat


def torch_name(flax_path: tuple[str, ...]) -> str:
    """``('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel')`` ->
    ``Mixed_5b.branch1x1.conv.weight``."""
    _, *mods, leaf = flax_path
    if mods[-1] == "conv":
        return ".".join(mods + ["weight"])
    if mods[-1] == "bn":
        name = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
        return ".".join(mods + [name[leaf]])
    if mods == ["fc"]:
        return "fc." + {"kernel": "weight", "bias": "bias"}[leaf]
    raise KeyError(flax_path)


def _to_torch_layout(flax_path, array: np.ndarray) -> np.ndarray:
    if flax_path[-1] == "kernel" and array.ndim == 4:  # HWIO -> OIHW
        return np.transpose(array, (3, 2, 0, 1))
    if flax_path[-1] == "kernel":  # Dense (in, out) -> (out, in)
        return array.T
    return array


def _to_flax_layout(flax_path, array: np.ndarray) -> np.ndarray:
    if flax_path[-1] == "kernel" and array.ndim == 4:  # OIHW -> HWIO
        return np.transpose(array, (2, 3, 1, 0))
    if flax_path[-1] == "kernel":
        return array.T
    return array


def torch_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The pytorch-fid state-dict names and shapes the weights file must contain."""
    out = {}
    for path, leaf in _flax_leaves(variable_shapes()).items():
        out[torch_name(path)] = _to_torch_layout(path, np.empty(leaf.shape, np.uint8)).shape
    return out


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Flax variables from a pytorch-fid state dict (names and shapes checked)."""
    expected = _flax_leaves(variable_shapes())
    names = {torch_name(p): p for p in expected}
    missing = sorted(set(names) - set(state_dict))
    extra = sorted(k for k in set(state_dict) - set(names) if not k.endswith("num_batches_tracked"))
    if missing or extra:
        raise InceptionWeightsError(
            f"the weights do not have the FID Inception layout: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''}"
        )
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for name, path in names.items():
        array = _to_flax_layout(path, np.asarray(state_dict[name], np.float32))
        if array.shape != tuple(expected[path].shape):
            raise InceptionWeightsError(
                f"weight {name} has shape {np.shape(state_dict[name])}, the FID Inception "
                f"expects {_to_torch_layout(path, np.empty(expected[path].shape)).shape}"
            )
        node = variables
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    return variables


def random_variables(seed: int = 0, scale: float = 0.05) -> dict[str, Any]:
    """Random weights with the right shapes (tests): He-like conv kernels, unit BN stats."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for path, leaf in _flax_leaves(variable_shapes()).items():
        if path[-1] == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
        elif path[-1] in ("scale", "var"):
            value = 1.0 + scale * rng.random(leaf.shape)
        else:
            value = scale * rng.normal(size=leaf.shape)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value.astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# weights files


def content_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """The content digest of a converted weights file: ``identity.arrays_digest`` of the
    arrays in sorted name order, fields separated by ``\\0`` (the file format's)."""
    return arrays_digest(sorted(arrays.items()), sep="\0")


def save_converted(state_dict: Mapping[str, Any], path: str, source_sha256: str) -> str:
    """Write the documented ``.npz`` layout; returns the content digest."""
    arrays = {
        k: np.asarray(v, np.float32)
        for k, v in state_dict.items()
        if not k.endswith("num_batches_tracked")
    }
    digest = content_sha256(arrays)
    buf = io.BytesIO()
    np.savez(
        buf,
        _format=np.asarray(CONVERTED_FORMAT),
        _source_sha256=np.asarray(source_sha256),
        _content_sha256=np.asarray(digest),
        **arrays,
    )
    atomic_write_bytes(path, buf.getvalue())
    return digest


def _read_pth(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise InceptionWeightsError(
            f"{path} is a pytorch file and torch is not installed here. "
            + weights_instructions(None)
        ) from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def convert(pth_path: str, out_path: str) -> str:
    """Convert pytorch-fid's ``.pth`` (sha256 checked) to the ``.npz`` layout; needs torch."""
    if not os.path.isfile(pth_path):
        raise InceptionWeightsError(f"no file at {pth_path!r}. " + weights_instructions(out_path))
    digest = sha256_file(pth_path)
    if digest != PT_INCEPTION_SHA256:
        raise InceptionWeightsError(
            f"{pth_path} has sha256 {digest}, not the FID Inception weights "
            f"({PT_INCEPTION_SHA256}). " + weights_instructions(out_path)
        )
    state = _read_pth(pth_path)
    variables_from_state_dict(state)  # layout check before writing
    return save_converted(state, out_path, digest)


def load_inception_variables(path: str | None, sha256: str | None = None) -> dict[str, Any]:
    """Flax variables of the FID Inception from a local file (see the module docstring)."""
    if not path or not os.path.isfile(path):
        where = f"no file at {path!r}" if path else "config.eval.inception_weights is not set"
        raise InceptionWeightsError(f"{where}. " + weights_instructions(path))
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256.lower():
            raise InceptionWeightsError(
                f"{path} has sha256 {digest}, but config.eval.inception_sha256 pins {sha256}. "
                + weights_instructions(path)
            )
    if path.endswith(".pth"):
        digest = sha256_file(path) if sha256 is None else sha256.lower()
        if digest != PT_INCEPTION_SHA256:
            raise InceptionWeightsError(
                f"{path} has sha256 {digest}, not the pinned FID Inception weights "
                f"{PT_INCEPTION_SHA256}. " + weights_instructions(None)
            )
        return variables_from_state_dict(_read_pth(path))
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError) as err:
        raise InceptionWeightsError(
            f"{path} is not a readable .npz ({err}). " + weights_instructions(path)
        ) from err
    fmt = str(arrays.pop("_format", ""))
    source = str(arrays.pop("_source_sha256", ""))
    content = str(arrays.pop("_content_sha256", ""))
    if fmt != CONVERTED_FORMAT:
        raise InceptionWeightsError(
            f"{path} is not a converted FID Inception file (format {fmt!r}, expected "
            f"{CONVERTED_FORMAT!r}). " + weights_instructions(path)
        )
    if source != PT_INCEPTION_SHA256:
        raise InceptionWeightsError(
            f"{path} was converted from a file with sha256 {source}, not the pinned FID "
            f"Inception weights {PT_INCEPTION_SHA256}. " + weights_instructions(path)
        )
    if content_sha256(arrays) != content:
        raise InceptionWeightsError(
            f"{path} is corrupted: its arrays do not match their recorded sha256 {content}. "
            + weights_instructions(path)
        )
    return variables_from_state_dict(arrays)


# --------------------------------------------------------------------------------------------
# the extractor


def pool_features(variables, images, *, resize: int | None = INPUT_SIZE) -> jax.Array:
    """pool_3 features (B, 2048) of NHWC ``images`` in [0, 255]: the network and its own
    preprocessing (:class:`InceptionV3`), not jitted. Float images need not be quantised, so
    the features are differentiable in them (the feature loss of the learned samplers)."""
    return InceptionV3(resize=resize).apply(variables, images)[0]


class InceptionExtractor:
    """``features_and_logits(images)``: pool_3 (B, 2048) and logits (B, 1008), jitted;
    ``feature_fn()``: the pool_3 features as a differentiable function.

    ``images``: NHWC, values in [0, 255] (uint8 or float), any size (resized to 299), 1 or 3
    channels. ``weights_sha256`` identifies the weights in statistics caches.
    """

    name = "inception_v3_fid_2015_12_05"
    feature_dim = FEATURE_DIM
    num_classes = NUM_CLASSES

    def __init__(self, variables, weights_sha256: str, resize: int | None = INPUT_SIZE):
        self.variables = jax.tree.map(jnp.asarray, variables)
        self.weights_sha256 = weights_sha256
        self.resize = resize
        module = InceptionV3(resize=resize)
        self._apply = jax.jit(lambda v, x: module.apply(v, x))

    @classmethod
    def from_file(cls, path: str | None, sha256: str | None = None) -> InceptionExtractor:
        """The extractor with the weights at ``path`` (see ``load_inception_variables``)."""
        variables = load_inception_variables(path, sha256)
        return cls(variables, PT_INCEPTION_SHA256)

    def features_and_logits(self, images):
        """``(pool features (B, 2048), logits)`` of images in [0, 255]."""
        return self._apply(self.variables, jnp.asarray(images))

    def feature_fn(self) -> jax.tree_util.Partial:
        """``images -> pool_3 features`` (:func:`pool_features`) with the weights bound as the
        pytree leaves of a ``jax.tree_util.Partial``: an argument of a jitted caller, never
        constants baked into its program."""
        return jax.tree_util.Partial(
            functools.partial(pool_features, resize=self.resize), self.variables
        )


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "convert":
        print(
            "usage: python -m deis_jax.evaluation.inception convert <pt_inception .pth> "
            "<out .npz>\n\n" + weights_instructions(None)
        )
        return 2
    digest = convert(argv[1], argv[2])
    print(f"wrote {argv[2]} (content sha256 {digest}, file sha256 {sha256_file(argv[2])})")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
