"""Class labels of conditional sampling: keyed by the global sample index only."""

import jax.numpy as jnp
import numpy as np
import pytest

from deis_jax.sampling.class_labels import ClassLabels


def test_random_labels_depend_only_on_the_index():
    labels = ClassLabels(num_classes=10, mode="random", seed=3)
    whole = np.asarray(labels(jnp.arange(64)))
    parts = np.concatenate([np.asarray(labels(jnp.arange(a, a + 16))) for a in range(0, 64, 16)])
    np.testing.assert_array_equal(whole, parts)
    shuffled = np.random.default_rng(0).permutation(64)
    np.testing.assert_array_equal(np.asarray(labels(jnp.asarray(shuffled))), whole[shuffled])
    assert whole.dtype == np.int32 and whole.min() >= 0 and whole.max() < 10


def test_random_labels_cover_the_classes_and_change_with_the_seed():
    a = np.asarray(ClassLabels(10, "random", seed=0)(jnp.arange(2000)))
    b = np.asarray(ClassLabels(10, "random", seed=1)(jnp.arange(2000)))
    counts = np.bincount(a, minlength=10)
    assert counts.min() > 150 and counts.max() < 250  # uniform: 200 +- 4.5 sd
    assert (a != b).mean() > 0.8


def test_fixed_and_cycle():
    np.testing.assert_array_equal(ClassLabels(5, "fixed", class_label=3)(jnp.arange(4)), [3] * 4)
    np.testing.assert_array_equal(ClassLabels(4, "cycle")(jnp.arange(3, 9)), [3, 0, 1, 2, 3, 0])
    one_hot = np.asarray(ClassLabels(4, "cycle").one_hot(jnp.arange(2)))
    np.testing.assert_array_equal(one_hot, [[1, 0, 0, 0], [0, 1, 0, 0]])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=0), "num_classes must be >= 1"),
        (dict(num_classes=10.0), "num_classes must be an int"),
        (dict(num_classes=10, mode="all"), "labels mode must be one of"),
        (dict(num_classes=10, mode="fixed", class_label=10), r"class_label must be in \[0, 9\]"),
        (dict(num_classes=10, class_label=True), "class_label must be an int"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        ClassLabels(**kwargs)
