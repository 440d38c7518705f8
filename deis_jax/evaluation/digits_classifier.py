"""A small digits classifier: the feature extractor of "FD-digits", FID's stand-in on digits.

FID needs a network trained on the data's domain; for the embedded digits dataset (16x16x1,
``deis_jax.common.data.digits_images``) that is this CNN, trained with labels on scikit-learn's
bundled digits. Its 64-d penultimate activations play the role of Inception's pool_3 (the
Frechet distance between their Gaussian fits is **FD-digits**) and its 10 logits give an
Inception-Score analogue. It goes through exactly the code of FID
(``deis_jax.evaluation.fid``): only the extractor differs.

Network (NHWC, input uint8 [0, 255] -> x/255 -> 2x - 1, the digits preprocessing)::

    Conv 3x3 16, SiLU, avg pool 2   -> 8x8x16
    Conv 3x3 32, SiLU, avg pool 2   -> 4x4x32
    flatten, Dense 64, SiLU         -> features (64)
    Dense 10                        -> logits

(SiLU, not ReLU, so that no feature is identically zero and the covariance stays full rank.)

The trained parameters are a ~150 kB msgpack file in the package,
``assets/digits_classifier.msgpack``, checked against ``WEIGHTS_SHA256`` when loaded. It is
trained by ``scripts/train_digits_classifier.py`` (seconds on a CPU): the 1797 images are
split 80/20 (stratified, fixed seed), the network is trained on the 80 % with random
one-pixel shifts, and the test accuracy on the held-out 20 % is stored next to the weights
(``assets/digits_classifier.json``). Retraining on another machine may give different bits;
the script prints the new sha256 to pin here.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from sklearn.datasets import load_digits

from deis_jax.common.data import digits_images
from deis_jax.common.files import atomic_write_bytes, atomic_write_text, sha256_file

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
WEIGHTS_PATH = os.path.join(ASSET_DIR, "digits_classifier.msgpack")
INFO_PATH = os.path.join(ASSET_DIR, "digits_classifier.json")
WEIGHTS_SHA256 = "4e9cd8e6094a5cf05f6386a2232fd36d77ec32c658556e882bbda4fafe642c30"
IMAGE_SHAPE = (16, 16, 1)
FEATURE_DIM = 64
NUM_CLASSES = 10


class DigitsNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: float in [-1, 1], (B, 16, 16, 1)
        x = nn.silu(nn.Conv(16, (3, 3), name="conv1")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.silu(nn.Conv(32, (3, 3), name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.silu(nn.Dense(FEATURE_DIM, name="dense")(x))
        return features, nn.Dense(NUM_CLASSES, name="logits")(features)


def preprocess(images) -> jax.Array:
    """uint8 / [0, 255] NHWC 16x16x1 -> float32 in [-1, 1] (the digits dataset's centring)."""
    x = jnp.asarray(images, jnp.float32)
    if tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(
            f"the digits classifier takes (B, 16, 16, 1) images in [0, 255], got {x.shape}"
        )
    return x / 127.5 - 1.0


def features(params, images) -> jax.Array:
    """The 64-d features of (B, 16, 16, 1) ``images`` in [0, 255] (:func:`preprocess`, then
    the network), not jitted. Float images need not be quantised, so the features are
    differentiable in them (the feature loss of the learned samplers)."""
    return DigitsNet().apply({"params": params}, preprocess(images))[0]


class DigitsClassifier:
    """Feature extractor (``deis_jax.evaluation.fid.FeatureExtractor``) for digits images;
    ``feature_fn()``: its features as a differentiable function."""

    name = "digits_classifier"
    feature_dim = FEATURE_DIM
    num_classes = NUM_CLASSES

    def __init__(self, params, weights_sha256: str):
        self.params = jax.tree.map(jnp.asarray, params)
        self.weights_sha256 = weights_sha256
        net = DigitsNet()
        self._apply = jax.jit(lambda p, x: net.apply({"params": p}, preprocess(x)))

    @classmethod
    def load(cls, path: str = WEIGHTS_PATH, sha256: str | None = WEIGHTS_SHA256):
        """The committed classifier (sha256 checked; ``sha256=None`` skips the check)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"digits classifier weights not found at {path}; regenerate them with "
                f"`python scripts/train_digits_classifier.py`"
            )
        digest = sha256_file(path)
        if sha256 is not None and digest != sha256:
            raise ValueError(
                f"{path} has sha256 {digest}, expected {sha256} (WEIGHTS_SHA256 in "
                f"deis_jax/evaluation/digits_classifier.py). If you retrained it with "
                f"scripts/train_digits_classifier.py, pin the new hash there."
            )
        with open(path, "rb") as f:
            params = serialization.msgpack_restore(f.read())
        return cls(params, digest)

    def features_and_logits(self, images):
        """``(features, logits)`` of uint8 / [0, 255] digits images."""
        return self._apply(self.params, images)

    def feature_fn(self) -> jax.tree_util.Partial:
        """``images -> features`` (:func:`features`) with the weights bound as the pytree
        leaves of a ``jax.tree_util.Partial`` (an argument of a jitted caller)."""
        return jax.tree_util.Partial(features, self.params)

    def predict(self, images) -> np.ndarray:
        """Predicted class of each image."""
        return np.asarray(jnp.argmax(self.features_and_logits(images)[1], axis=-1))


# --------------------------------------------------------------------------------------------
# training (scripts/train_digits_classifier.py)


def labelled_digits(seed: int = 0, test_fraction: float = 0.2):
    """``(x_train, y_train, x_test, y_test)``: uint8 16x16x1 images (``data.digits_images``)
    with their labels, split stratified by class with a fixed permutation."""
    images = digits_images(16)
    labels = load_digits().target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test[idx[: int(round(test_fraction * len(idx)))]] = True
    return images[~test], labels[~test], images[test], labels[test]


def _shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random shifts of up to one pixel (background 0 fills in)."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.empty_like(images)
    dy, dx = rng.integers(0, 3, size=(2, len(images)))
    for i in range(len(images)):
        out[i] = padded[i, dy[i] : dy[i] + 16, dx[i] : dx[i] + 16]
    return out


def train(
    seed: int = 0, steps: int = 1500, batch_size: int = 128, lr: float = 3e-3
) -> tuple[dict, dict]:
    """Train the classifier; returns ``(params, info)`` with train/test accuracy."""
    x_tr, y_tr, x_te, y_te = labelled_digits(seed)
    net = DigitsNet()
    params = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, *IMAGE_SHAPE)))["params"]
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = net.apply({"params": p}, preprocess(x))[1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(x_tr), batch_size, replace=False)
        params, opt_state, _ = step(params, opt_state, _shift(x_tr[idx], rng), y_tr[idx])

    clf = DigitsClassifier(params, "")
    info = {
        "train_accuracy": float(np.mean(clf.predict(x_tr) == y_tr)),
        "test_accuracy": float(np.mean(clf.predict(x_te) == y_te)),
        "num_train": int(len(y_tr)),
        "num_test": int(len(y_te)),
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "jax": jax.__version__,
    }
    return jax.device_get(params), info


def save(params, info: dict, path: str = WEIGHTS_PATH, info_path: str = INFO_PATH) -> str:
    """Write the msgpack weights and the json info; returns the weights' sha256."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    atomic_write_bytes(path, serialization.msgpack_serialize(params))
    digest = sha256_file(path)
    atomic_write_text(info_path, json.dumps({**info, "sha256": digest}, indent=2) + "\n")
    return digest
