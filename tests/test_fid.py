"""FID / FD, IS and KID: closed forms, streaming = batch, sharded = unsharded, file formats."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from damage import truncate

from deis_jax.common.parallel import simulated_device_flags
from deis_jax.evaluation import fid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1) * np.eye(d)


@pytest.mark.numerics
def test_frechet_distance_closed_form_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    # Diagonal (commuting) covariances: W2^2 = |mu1 - mu2|^2 + sum (sqrt s1 - sqrt s2)^2.
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(exact, rel=1e-12, abs=1e-12)
    # Same eigenvectors, rotated: still closed form.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got = fid.frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(exact, rel=1e-10)
    # General covariances: sqrtm and the symmetric eigh form agree.
    c1, c2 = _random_cov(rng, d), _random_cov(rng, d)
    a = fid.frechet_distance(mu1, c1, mu2, c2)
    b = fid.frechet_distance_eigh(mu1, c1, mu2, c2)
    assert a == pytest.approx(b, rel=1e-10)
    assert fid.frechet_distance(mu2, c2, mu1, c1) == pytest.approx(a, rel=1e-10)  # symmetric


def test_fid_of_a_set_with_itself_is_zero_and_singular_fallback(monkeypatch):
    import scipy.linalg

    rng = np.random.default_rng(1)
    feats = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    s = fid.FeatureStats.from_features(feats)
    assert abs(fid.fd_from_stats(s, s)) < 1e-8
    # Fewer samples than dimensions: singular covariances still give a finite value.
    a = fid.FeatureStats.from_features(rng.normal(size=(5, 32)))
    b = fid.FeatureStats.from_features(rng.normal(size=(5, 32)))
    value = fid.fd_from_stats(a, b)
    assert value == pytest.approx(fid.frechet_distance_eigh(a.mean, a.cov, b.mean, b.cov), 1e-6)
    # When sqrtm fails (not finite), eps I is added to both covariances and it is retried.
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def flaky_sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    with pytest.warns(RuntimeWarning, match="singular"):
        retried = fid.fd_from_stats(a, b)
    assert len(calls) == 2 and retried == pytest.approx(value, rel=1e-4)


def test_streaming_stats_equal_batch_stats_and_merge_is_associative():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(257, 12)) * 3 + 5
    stream = fid.FeatureStats.empty(12)
    for chunk in np.array_split(feats, 7):
        stream.update(chunk)
    np.testing.assert_allclose(stream.mean, feats.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stream.cov, np.cov(feats, rowvar=False), rtol=1e-11, atol=1e-12)
    parts = [fid.FeatureStats.from_features(c) for c in np.array_split(feats, 3)]
    left = (parts[0] + parts[1]) + parts[2]
    right = parts[0].merge(parts[1].merge(parts[2]))
    for s in (left, right):
        assert s.n == 257
        np.testing.assert_allclose(s.sum_outer, stream.sum_outer, rtol=1e-13)
    # Device moments (jit) accumulate to the same statistics.
    dev = fid.FeatureStats.empty(12)
    moments = jax.jit(fid.moments)
    for chunk in np.array_split(feats.astype(np.float32), 4):
        dev.add_moments(*moments(chunk))
    np.testing.assert_allclose(dev.cov, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-4)


SHARDED = textwrap.dedent(
    """
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import NamedSharding, PartitionSpec as P
    from deis_jax.evaluation import fid
    assert jax.device_count() == 8, jax.devices()
    from deis_jax.training.loop import make_mesh
    mesh = make_mesh()  # ('data',), automatic axes as everywhere in the project
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(64, 10)) * 2 + 1
    x = jax.device_put(feats, NamedSharding(mesh, P("data")))
    assert len(x.addressable_shards) == 8
    sharded = fid.FeatureStats.empty(10).add_moments(*jax.jit(fid.moments)(x))
    # per device, then merged (as per host)
    per_device = [fid.FeatureStats.from_features(np.asarray(s.data)) for s in x.addressable_shards]
    merged = per_device[0]
    for s in per_device[1:]:
        merged = merged.merge(s)
    full = fid.FeatureStats.from_features(feats)
    for s in (sharded, merged):
        assert s.n == 64
        np.testing.assert_allclose(s.mean, full.mean, rtol=1e-12)
        np.testing.assert_allclose(s.cov, full.cov, rtol=1e-10, atol=1e-12)
    assert abs(fid.fd_from_stats(sharded, full)) < 1e-9
    print("OK")
    """
)


def test_sharded_stats_on_8_devices_equal_unsharded():
    env = dict(os.environ, XLA_FLAGS=simulated_device_flags(os.environ.get("XLA_FLAGS"), 8))
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", SHARDED], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def _mmd_direct(x, y):
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


@pytest.mark.numerics
def test_kid_matches_the_direct_unbiased_formula():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20, 5)), rng.normal(size=(20, 5)) + 0.5
    # One subset holding every sample: KID is the unbiased MMD^2 of the two sets.
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=1, subset_size=20)
    assert mean == pytest.approx(_mmd_direct(x, y), rel=1e-10)
    assert std == 0.0
    same, _ = fid.kernel_inception_distance(
        rng.normal(size=(400, 5)), rng.normal(size=(400, 5)), num_subsets=5, subset_size=200
    )
    assert abs(same) < 0.05 < fid.kernel_inception_distance(x, y, 5, 15)[0]


@pytest.mark.numerics
def test_inception_score_direct_formula_and_streaming():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(60, 7)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    marginal = p.mean(0)
    direct = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1)))
    assert fid.inception_score(logits, splits=1)[0] == pytest.approx(direct, rel=1e-12)
    # Uniform predictions: IS = 1; confident and balanced over C classes: IS = C.
    assert fid.inception_score(np.zeros((10, 5)), 1)[0] == pytest.approx(1.0)
    confident = 50.0 * np.eye(5)[np.arange(100) % 5]
    assert fid.inception_score(confident, 2)[0] == pytest.approx(5.0, rel=1e-6)
    # Streaming accumulation in shuffled chunks equals the split formula.
    stream = fid.ISStats.empty(7, total=60, splits=3)
    order = rng.permutation(60)
    for chunk in np.array_split(order, 5):
        stream.update(logits[chunk], chunk)
    np.testing.assert_allclose(stream.result(), fid.inception_score(logits, 3), rtol=1e-12)


def test_stats_file_formats(tmp_path):
    rng = np.random.default_rng(5)
    acts = rng.normal(size=(50, 8))
    mu, sigma = acts.mean(0), np.cov(acts, rowvar=False)
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # pytorch-fid / OpenAI
    np.savez(tmp_path / "score_sde.npz", pool_3=acts.astype(np.float32))  # score_sde
    stats = fid.FeatureStats.from_features(acts)
    fid.save_stats(str(tmp_path / "ours.npz"), stats, dataset="digits", split="train")
    for name in ("pytorch_fid.npz", "score_sde.npz", "ours.npz"):
        m, s, meta = fid.load_stats(str(tmp_path / name))
        np.testing.assert_allclose(m, mu, rtol=1e-6)
        np.testing.assert_allclose(s, sigma, rtol=1e-5, atol=1e-6)
    assert meta["dataset"] == "digits"
    again = fid.load_feature_stats(str(tmp_path / "ours.npz"))
    assert again.n == 50 and np.array_equal(again.sum_outer, stats.sum_outer)
    np.savez(tmp_path / "bad.npz", foo=acts)
    with pytest.raises(ValueError, match="mu"):
        fid.load_stats(str(tmp_path / "bad.npz"))


def test_digits_classifier_is_pinned_and_accurate(tmp_path):
    from deis_jax.evaluation import digits_classifier as dc

    clf = dc.DigitsClassifier.load()  # checks the pinned sha256
    assert clf.weights_sha256 == dc.WEIGHTS_SHA256
    _, _, x_test, y_test = dc.labelled_digits()
    assert np.mean(clf.predict(x_test) == y_test) > 0.97
    feats, logits = clf.features_and_logits(x_test[:8])
    assert feats.shape == (8, 64) and logits.shape == (8, 10)
    tampered = tmp_path / "clf.msgpack"
    tampered.write_bytes(open(dc.WEIGHTS_PATH, "rb").read() + b"\0")
    with pytest.raises(ValueError, match="WEIGHTS_SHA256"):
        dc.DigitsClassifier.load(str(tampered))


def test_a_damaged_user_statistics_file_is_refused_by_name(tmp_path):
    path = str(tmp_path / "cifar10_stats.npz")
    fid.save_stats(path, fid.FeatureStats.from_features(np.eye(4)))
    truncate(path)
    with pytest.raises(fid.StatsFileError, match=re.escape(f"statistics file {path!r} is damaged")):
        fid.load_stats(path)
