"""Which class each sample of a class-conditional model is drawn for.

    labels = ClassLabels(num_classes=1000, mode="random", seed=0)
    labels(jnp.arange(8))          # int32 (8,): the classes of samples 0..7

A sample's class depends only on its global index (and the seed), exactly like its ``x_T``
(``deis_jax.common.parallel.prior_draws``): the class of sample ``i`` is the same whatever the batch
size, the number of devices or processes, or where a restart happened. Modes
(``config.sampling.labels`` / ``config.eval.labels``):

==========  ==================================================================================
``random``  ``randint(fold_in(label_key, i), 0, num_classes)`` with ``label_key`` a stream of
            the seed independent of the prior and noise keys (``parallel.sample_keys``)
``fixed``   every sample is ``class_label``
``cycle``   all classes in turn: ``i mod num_classes`` (50 000 ImageNet samples = 50 of each)
==========  ==================================================================================

The network sees ``one_hot(labels, num_classes)`` (EDM's ``class_labels``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LABEL_MODES = ("random", "fixed", "cycle")

# fold_in data of the label stream: distinct from split(PRNGKey(seed)) (prior, noise keys)
_LABEL_STREAM = 0x1ABE1


@dataclasses.dataclass(frozen=True)
class ClassLabels:
    """The class of every sample, keyed by its global index (see the module docstring)."""

    num_classes: int
    mode: str = "random"
    class_label: int = 0
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise TypeError(f"num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.mode not in LABEL_MODES:
            raise ValueError(f"labels mode must be one of {list(LABEL_MODES)}, got {self.mode!r}")
        if isinstance(self.class_label, bool) or not isinstance(self.class_label, int):
            raise TypeError(f"class_label must be an int, got {self.class_label!r}")
        if not 0 <= self.class_label < self.num_classes:
            raise ValueError(
                f"class_label must be in [0, {self.num_classes - 1}], got {self.class_label}"
            )

    def __call__(self, indices: jax.Array) -> jax.Array:
        """int32 classes of the samples with global ``indices`` (any shape)."""
        indices = jnp.asarray(indices)
        if self.mode == "fixed":
            return jnp.full(indices.shape, self.class_label, jnp.int32)
        if self.mode == "cycle":
            return (indices % self.num_classes).astype(jnp.int32)
        key = jax.random.fold_in(jax.random.PRNGKey(int(self.seed)), _LABEL_STREAM)

        def draw(i):
            return jax.random.randint(jax.random.fold_in(key, i), (), 0, self.num_classes)

        flat = jax.vmap(draw)(indices.reshape(-1))
        return flat.reshape(indices.shape).astype(jnp.int32)

    def one_hot(self, indices: jax.Array) -> jax.Array:
        """float32 ``(..., num_classes)`` one-hot rows of the samples' classes."""
        return jax.nn.one_hot(self(indices), self.num_classes, dtype=jnp.float32)

    def describe(self) -> dict:
        """JSON-able settings (they change the samples, so they belong to a run's identity)."""
        return dataclasses.asdict(self)
