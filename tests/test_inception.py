"""The FID Inception-v3: pytorch-fid layout, runs on random weights, weights-file checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deis_jax.common.files import sha256_file
from deis_jax.evaluation import inception as inc


def test_parameter_layout_is_pytorch_fid():
    shapes = inc.torch_state_dict_shapes()
    # 94 BasicConv2d (conv + 4 BN arrays) + fc weight/bias; num_batches_tracked excluded.
    assert len(shapes) == 94 * 5 + 2
    assert sum(k.endswith(".conv.weight") for k in shapes) == 94
    assert sum(int(np.prod(s)) for s in shapes.values()) == 23_885_392
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for name, shape in expected.items():
        assert shapes[name] == shape, name


def test_documented_input_sizes_shapes():
    """Any input size is resized to 299 (eval_shape: nothing is computed)."""
    variables = inc.variable_shapes()
    for shape in ((2, 32, 32, 3), (1, 16, 16, 1), (1, 299, 299, 3)):
        x = jax.ShapeDtypeStruct(shape, jnp.uint8)
        feats, logits = jax.eval_shape(inc.InceptionV3().apply, variables, x)
        assert feats.shape == (shape[0], 2048) and logits.shape == (shape[0], 1008)


def test_runs_on_random_weights_small_inputs():
    extractor = inc.InceptionExtractor(inc.random_variables(0), "random", resize=75)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    feats, logits = extractor.features_and_logits(images)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert np.all(np.isfinite(feats)) and np.all(np.asarray(feats) >= 0)  # post-ReLU pool
    assert float(jnp.std(feats)) > 0
    grey = extractor.features_and_logits(images[..., :1])[0]  # 1 channel -> repeated
    rgb = extractor.features_and_logits(np.repeat(images[..., :1], 3, axis=-1))[0]
    np.testing.assert_allclose(grey, rgb, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="at least 75"):
        inc.InceptionV3(resize=None).apply(inc.random_variables(0), jnp.zeros((1, 32, 32, 3)))


def _fake_state_dict():
    rng = np.random.default_rng(1)
    state = {k: np.zeros(s, np.float32) for k, s in inc.torch_state_dict_shapes().items()}
    state["Conv2d_1a_3x3.conv.weight"] = rng.normal(size=(32, 3, 3, 3)).astype(np.float32)
    state["fc.weight"][:3, :4] = rng.normal(size=(3, 4))
    state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.asarray(7)
    return state


def test_weights_loader_checks_hashes_and_layout(tmp_path):
    state = _fake_state_dict()
    good = str(tmp_path / "good.npz")
    inc.save_converted(state, good, inc.PT_INCEPTION_SHA256)
    variables = inc.load_inception_variables(good)
    conv = variables["params"]["Conv2d_1a_3x3"]["conv"]["kernel"]  # HWIO
    np.testing.assert_array_equal(conv, state["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state["fc.weight"].T)
    assert variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"].shape == (192,)

    # The file's own sha256 when the config pins it.
    digest = sha256_file(good)
    inc.load_inception_variables(good, sha256=digest)
    with pytest.raises(inc.InceptionWeightsError, match="config.eval.inception_sha256"):
        inc.load_inception_variables(good, sha256="0" * 64)

    # Converted from another file than the pinned pytorch-fid weights.
    wrong = str(tmp_path / "wrong.npz")
    inc.save_converted(state, wrong, "ab" * 32)
    with pytest.raises(inc.InceptionWeightsError) as err:
        inc.load_inception_variables(wrong)
    message = str(err.value)
    assert inc.PT_INCEPTION_SHA256 in message and "pt_inception-2015-12-05-6726825d.pth" in message
    assert "python -m deis_jax.evaluation.inception convert" in message

    # Corrupted arrays, a wrong layout, a missing file, a .pth with the wrong hash.
    with np.load(good) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["fc.bias"] = arrays["fc.bias"] + 1
    np.savez(tmp_path / "corrupt.npz", **arrays)
    with pytest.raises(inc.InceptionWeightsError, match="corrupted"):
        inc.load_inception_variables(str(tmp_path / "corrupt.npz"))
    del state["fc.bias"]
    inc.save_converted(state, str(tmp_path / "layout.npz"), inc.PT_INCEPTION_SHA256)
    with pytest.raises(inc.InceptionWeightsError, match="missing.*fc.bias"):
        inc.load_inception_variables(str(tmp_path / "layout.npz"))
    with pytest.raises(inc.InceptionWeightsError, match="download"):
        inc.load_inception_variables(str(tmp_path / "absent.npz"))
    (tmp_path / "fake.pth").write_bytes(b"not the weights")
    with pytest.raises(inc.InceptionWeightsError, match="not the pinned FID Inception"):
        inc.load_inception_variables(str(tmp_path / "fake.pth"))
    with pytest.raises(inc.InceptionWeightsError, match="not the FID Inception weights"):
        inc.convert(str(tmp_path / "fake.pth"), str(tmp_path / "out.npz"))
