"""Data pipelines: tfds (mocked, no TF, no network) and the embedded digits."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from deis_jax.common import data


def data_config(name="cifar10", image_size=32, num_channels=3, **kw):
    values = dict(
        name=name,
        data_dir=None,
        image_size=image_size,
        num_channels=num_channels,
        centered=True,
        random_flip=False,
        uniform_dequantization=False,
    )
    values.update(kw)
    return ml_collections.ConfigDict(values)


@pytest.fixture
def mocked_tfds():
    with tfds.testing.mock_data(num_examples=12):
        yield


@pytest.mark.parametrize(
    "name,size",
    [("cifar10", 32), ("celeb_a", 64), ("downsampled_imagenet/32x32", 32)],
)
@pytest.mark.parametrize("centered", [True, False])
def test_tfds_datasets_shapes_and_ranges(mocked_tfds, name, size, centered):
    cfg = data_config(name, size, centered=centered)
    ds = data.get_dataset(cfg, batch_size=4, seed=0)
    batch = ds[1]
    assert batch.shape == (4, size, size, 3) and batch.dtype == np.float32
    lo, hi = (-1.0, 1.0) if centered else (0.0, 1.0)
    assert batch.min() >= lo and batch.max() <= hi
    assert batch.max() - batch.min() > 0.5 * (hi - lo)  # real pixel values, not a constant
    # deterministic: a fresh pipeline with the same seed gives the same batch
    np.testing.assert_array_equal(data.get_dataset(cfg, batch_size=4, seed=0)[1], batch)


def test_celeba_is_central_crop_140_then_resize():
    image = np.full((218, 178, 3), 255, np.uint8)
    top, left = (218 - 140) // 2, (178 - 140) // 2
    image[top : top + 140, left : left + 140] = 0  # everything outside the crop is white
    image[top : top + 70, left : left + 140, 0] = 200  # top half of the crop: red
    x = data.to_unit_float(image, "celeb_a", 64)
    assert x.shape == (64, 64, 3)
    assert x.max() <= 200 / 255 + 1e-6  # nothing of the white border leaks in
    np.testing.assert_allclose(x[:30, :, 0], 200 / 255, atol=1e-5)
    np.testing.assert_allclose(x[34:, :, 0], 0.0, atol=1e-5)


def test_random_flip_mirrors_some_images_only_when_training(mocked_tfds):
    plain = data.get_dataset(data_config(random_flip=False), batch_size=12, seed=3)[0]
    flipped = data.get_dataset(data_config(random_flip=True), batch_size=12, seed=3)[0]
    evaluation = data.get_dataset(data_config(random_flip=True), batch_size=12, seed=3, train=False)
    np.testing.assert_array_equal(evaluation[0], plain)
    same = [np.array_equal(f, p) for f, p in zip(flipped, plain, strict=True)]
    mirrored = [np.array_equal(f, p[:, ::-1]) for f, p in zip(flipped, plain, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 0 < sum(mirrored) < 12


def test_uniform_dequantization_centering():
    cfg = data_config("digits", 16, 1, uniform_dequantization=True, centered=False)
    batch = data.get_dataset(cfg, batch_size=32, seed=0)[0]
    plain = data.get_dataset(data_config("digits", 16, 1, centered=False), batch_size=32, seed=0)[0]
    assert np.all((batch >= plain * 255 / 256) & (batch <= (plain * 255 + 1) / 256 + 1e-6))
    assert not np.allclose(batch * 256, np.round(batch * 256))


def test_per_epoch_shuffle_is_a_permutation_and_resumable():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * np.ones((1, 4, 4, 1), np.uint8)
    source = data.ArraySource(images)
    cfg = data_config("digits", 4, 1, centered=False)
    ds = data.get_dataset(cfg, batch_size=5, seed=1, source=source)

    def ids(batch):
        return list(np.round(batch[:, 0, 0, 0] * 255).astype(int))

    epoch0, epoch1 = ids(ds[0]) + ids(ds[1]), ids(ds[2]) + ids(ds[3])
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1 and epoch0 != list(range(10))  # reshuffled every epoch
    other_seed = data.get_dataset(cfg, batch_size=5, seed=2, source=source)
    assert ids(other_seed[0]) + ids(other_seed[1]) != epoch0
    # resuming at step s yields ds[s], ds[s + 1], ... (no iterator state needed)
    it = data.iterate(ds, 3)
    for step in (3, 4, 5):
        np.testing.assert_array_equal(next(it), ds[step])
    # two processes each read a strided half of the same global batch
    halves = [
        data.get_dataset(
            cfg, batch_size=4, seed=1, source=source, process_index=p, process_count=2
        )[7]
        for p in (0, 1)
    ]
    whole = data.get_dataset(cfg, batch_size=4, seed=1, source=source)[7]
    assert sorted(ids(np.concatenate(halves))) == sorted(ids(whole))


def test_digits_dataset():
    images = data.digits_images(16)
    assert images.shape == (1797, 16, 16, 1) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    from sklearn.datasets import load_digits

    # averaging 2x2 blocks of the (smooth, bilinear) upsampled digit gives back the 8x8 one
    small = images[..., 0].reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4)) / 255.0
    original = load_digits().images / 16.0
    assert np.corrcoef(small.ravel(), original.ravel())[0, 1] > 0.97
    assert np.abs(small - original).mean() < 0.1
    batch = data.get_dataset(data_config("digits", 16, 1), batch_size=8, seed=0)[0]
    assert batch.shape == (8, 16, 16, 1) and batch.min() >= -1.0 and batch.max() <= 1.0


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.get_dataset(data_config(data_dir=str(tmp_path)), batch_size=4, seed=0)
    message = str(info.value)
    assert str(tmp_path) in message and "config.data.data_dir" in message
    assert "scripts/prepare_data.py --dataset=cifar10" in message
    assert "tfds build cifar10 --file_format=array_record" in message
    assert "\n" not in message  # one line, as main.py prints it


def test_postprocess_inverts_centering():
    x = np.linspace(0, 1, 11, dtype=np.float32)
    np.testing.assert_allclose(data.postprocess(2 * x - 1, centered=True), x, atol=1e-6)
    np.testing.assert_allclose(data.postprocess(x + 0.5, centered=False).max(), 1.0)
