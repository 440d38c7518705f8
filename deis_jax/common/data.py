"""Training data: tensorflow-datasets read without TensorFlow, plus an embedded digits set.

Run time never imports TensorFlow. tfds datasets are opened with
``tfds.builder(name, data_dir=..., file_format='array_record').as_data_source(split)`` -- a
random-access ArrayRecord source of numpy examples (the builder form, because
``tfds.data_source(name, data_dir=...)`` may not find local data, tensorflow/datasets#5665) --
and batched with ``grain.MapDataset``. *Preparing* a tfds image dataset still needs TensorFlow
(its PNG/JPEG encoding calls ``tf.image``); do that once with ``scripts/prepare_data.py``.

Datasets (``config.data.name``):

================================  =============================================================
``cifar10``                       32x32x3, split ``train`` (score_sde's CIFAR-10).
``celeb_a``                       score_sde's CelebA: central crop 140x140 of the 218x178
                                  aligned image, then bilinear anti-aliased resize to
                                  ``image_size`` (64), computed in float.
``downsampled_imagenet/32x32``    ImageNet 32x32 of van den Oord et al. (2016), unlabelled: the
                                  generative-modelling / likelihood benchmark the diffusion
                                  literature (and the DEIS ImageNet-32 table) uses.
                                  ``imagenet_resized/32x32`` (Chrabaszcz et al. 2017, labelled,
                                  for classification) is also accepted but resizes differently,
                                  so its images and FID statistics are not interchangeable.
``digits``                        embedded, no download: scikit-learn's 1797 8x8 digits
                                  (values 0..16), bilinearly upsampled to 16x16 (upsampling, not
                                  padding, so the digit fills the frame and a small net sees
                                  smooth strokes), quantised to uint8, 1 channel.
================================  =============================================================

Every example goes through the same score_sde preprocessing: uint8 -> float in [0, 1],
optional random horizontal flip, optional uniform dequantisation ``(255 x + u) / 256``, and,
when ``config.data.centered``, ``2 x - 1`` (range [-1, 1]).

Determinism: the training stream is a pure function of ``(seed, step)``. Element ``i`` of the
infinite stream is element ``i mod N`` of epoch ``i // N``'s permutation (grain's index
shuffle, reseeded per epoch); per-element randomness (flip, dequantisation) is seeded by the
element index. Batch ``step`` is elements ``[step B, (step + 1) B)``, so resuming at ``step``
needs no iterator state. With several processes each reads a strided share of the global batch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence

import grain
import numpy as np
from PIL import Image

TFDS_DATASETS = (
    "cifar10",
    "celeb_a",
    "downsampled_imagenet/32x32",
    "imagenet_resized/32x32",
    "imagenet_resized/64x64",
)
EMBEDDED_DATASETS = ("digits",)
DATASETS = TFDS_DATASETS + EMBEDDED_DATASETS

# Channels of the stored images (the config must agree).
NUM_CHANNELS = {name: 3 for name in TFDS_DATASETS} | {"digits": 1}

CELEBA_CROP = 140  # score_sde datasets.py: central_crop(img, 140) before resizing

_PREPARE_HINTS = {
    "cifar10": "It downloads itself (~160 MB from www.cs.toronto.edu).",
    "celeb_a": (
        "tfds downloads it from Google Drive, which is often quota-limited: if that fails, "
        "download img_align_celeba.zip, list_eval_partition.txt, list_attr_celeba.txt, "
        "list_landmarks_align_celeba.txt and identity_CelebA.txt from the CelebA site "
        "(mmlab.ie.cuhk.edu.hk/projects/CelebA.html) into one folder and pass it as "
        "--manual_dir."
    ),
    "downsampled_imagenet/32x32": (
        "Its official URL (image-net.org/small/) is broken (tensorflow/datasets#4662): obtain "
        "train_32x32.tar and valid_32x32.tar (e.g. from an Academic Torrents mirror) into one "
        "folder and pass it as --manual_dir."
    ),
    "imagenet_resized/32x32": (
        "Its URL (image-net.org/data/downsample/) has broken repeatedly "
        "(tensorflow/datasets#3563); see scripts/prepare_data.py --help."
    ),
    "imagenet_resized/64x64": (
        "Its URL (image-net.org/data/downsample/) has broken repeatedly "
        "(tensorflow/datasets#3563); see scripts/prepare_data.py --help. The FID of EDM's "
        "ImageNet-64 model needs no dataset: pass EDM's reference statistics "
        "(config.eval.reference_stats)."
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """A tfds dataset is not prepared (in ArrayRecord format) under the given data_dir."""


def default_data_dir() -> str:
    """tfds' default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _missing_message(name: str, data_dir: str | None, split: str, cause: BaseException) -> str:
    """One line: where the dataset was looked for, how to prepare it, and the way around."""
    where = data_dir or default_data_dir()
    said = " ".join(f"{type(cause).__name__}: {cause}".split())
    return (
        f"Dataset {name!r} (split {split!r}) is not prepared in ArrayRecord format under "
        f"data_dir={where!r} (config.data.data_dir). Prepare it once, on any machine with "
        f"TensorFlow (deis_jax then reads it without TensorFlow): pip install tensorflow "
        f"tensorflow-datasets && python scripts/prepare_data.py --dataset={name} "
        f"--data_dir={where} (equivalently: tfds build {name} --file_format=array_record "
        f"--data_dir={where}), and copy {where}/{name}/ here. {_PREPARE_HINTS.get(name, '')} "
        f"To try the code without any download use config.data.name='digits' "
        f"(configs/vpsde_digits.py). [tfds said: {said}]"
    )


def tfds_source(name: str, split: str = "train", data_dir: str | None = None):
    """Random-access ArrayRecord source of a prepared tfds dataset (no TensorFlow needed)."""
    if name not in TFDS_DATASETS:
        raise ValueError(f"tfds dataset must be one of {TFDS_DATASETS}, got {name!r}")
    import tensorflow_datasets as tfds  # imported lazily: the digits path does not need it

    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        return builder.as_data_source(split=split)
    except (KeyError, FileNotFoundError, ValueError, AssertionError, OSError) as err:
        raise DatasetNotFoundError(_missing_message(name, data_dir, split, err)) from err


@functools.lru_cache(maxsize=4)
def digits_images(image_size: int = 16) -> np.ndarray:
    """scikit-learn's bundled 8x8 digits, bilinearly upsampled: uint8 ``(1797, S, S, 1)``."""
    from sklearn.datasets import load_digits

    digits = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    if image_size != 8:
        digits = np.stack([_resize(img[..., None], image_size)[..., 0] for img in digits])
    return np.round(np.clip(digits, 0.0, 1.0) * 255.0).astype(np.uint8)[..., None]


class ArraySource(Sequence):
    """A random-access source over an in-memory uint8 image array, tfds-style examples."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index]}


def get_source(data_config, split: str = "train"):
    """The random-access source for ``config.data`` (tfds ArrayRecord or embedded)."""
    name = data_config.name
    if name == "digits":
        if split != "train":
            raise ValueError("the digits dataset has only a 'train' split (all 1797 images)")
        return ArraySource(digits_images(int(data_config.image_size)))
    return tfds_source(name, split=split, data_dir=data_config.get("data_dir"))


# --- preprocessing ------------------------------------------------------------------------


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float HWC image to ``size x size`` (anti-aliased when shrinking)."""

    if image.shape[:2] == (size, size):
        return image
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize(
                (size, size), Image.BILINEAR
            )
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def _central_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    size = min(size, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def to_unit_float(image: np.ndarray, name: str, image_size: int) -> np.ndarray:
    """uint8 HWC -> float32 in [0, 1] at ``image_size x image_size`` (dataset-specific crop)."""
    x = np.asarray(image, np.float32) / 255.0
    if name == "celeb_a":
        x = _central_crop(x, CELEBA_CROP)
    elif x.shape[0] != x.shape[1]:  # non-square input (only mocked data): centre square
        x = _central_crop(x, min(x.shape[:2]))
    return np.clip(_resize(x, image_size), 0.0, 1.0)


def _process(example, rng: np.random.Generator, *, data_config, train: bool) -> np.ndarray:
    x = to_unit_float(example["image"], data_config.name, int(data_config.image_size))
    flip = rng.random() < 0.5  # always drawn, so the stream does not depend on the options
    if train and data_config.random_flip and flip:
        x = x[:, ::-1]
    if data_config.get("uniform_dequantization", False):
        x = (x * 255.0 + rng.random(x.shape, dtype=np.float32)) / 256.0
    if data_config.centered:
        x = 2.0 * x - 1.0
    return np.ascontiguousarray(x, dtype=np.float32)


def postprocess(x, centered: bool):
    """Model space back to float32 images in [0, 1] (the inverse of the centring, clipped).

    A numpy array (or anything ``np.asarray`` takes) gives a numpy array; a jax array, also a
    traced one, gives a jax array by the same array methods -- differentiable, with zero
    gradient where clipped (the feature loss, ``deis_jax.evaluation.fid.sample_pixels``)."""
    x = (x if hasattr(x, "clip") else np.asarray(x)).astype(np.float32)
    if centered:
        x = (x + 1.0) / 2.0
    return x.clip(0.0, 1.0)


# --- pipelines ----------------------------------------------------------------------------


def get_dataset(
    data_config,
    *,
    batch_size: int,
    seed: int,
    split: str = "train",
    train: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    source=None,
) -> grain.MapDataset:
    """An infinite, random-access dataset of batches: ``ds[step]`` is a float32 NHWC batch.

    ``batch_size`` is the *global* batch; this process gets rows
    ``process_index::process_count`` of it (its local share). ``train=False`` disables the
    random flip (dequantisation still follows ``data_config``).
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must divide by process_count={process_count}")
    src = get_source(data_config, split) if source is None else source
    if len(src) == 0:
        raise ValueError(f"dataset {data_config.name!r} split {split!r} is empty")
    ds = grain.MapDataset.source(src).seed(int(seed) % 2**32).shuffle().repeat()
    ds = ds.random_map(functools.partial(_process, data_config=data_config, train=train))
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds.batch(batch_size // process_count, drop_remainder=True)


def iterate(
    ds: grain.MapDataset, start_step: int = 0, *, num_threads: int = 4, prefetch: int = 8
) -> Iterator[np.ndarray]:
    """Batches ``ds[start_step], ds[start_step + 1], ...`` read ahead by a thread pool."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds[start_step:].to_iter_dataset(options))
