"""EDM networks through the experiment configs: converted checkpoint -> config -> eps_fn ->
samples, class labels and classifier-free guidance (the small fixture models of
tests/fixtures/edm, made with EDM's own code)."""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from edm_fixture_models import nhwc, small_model

from configs import edm_cifar10_vp
from deis_jax.common.checks import ConfigError
from deis_jax.experiments import build, generation
from deis_jax.experiments import sample as sample_mode
from deis_jax.models import loading
from deis_jax.models.edm.convert import convert_state_dict
from deis_jax.sampling.class_labels import ClassLabels

COND = "cifar10_cond_vp"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The conditional fixture model converted to the project's checkpoint format."""
    m = small_model(COND)
    out = str(tmp_path_factory.mktemp("edm") / "cond_vp")
    convert_state_dict(
        m.meta["precond_class"], m.meta["constructor_kwargs"], m.meta["precond_attrs"],
        m.state_dict, out,
    )  # fmt: skip
    return out


def small_config(checkpoint: str, **sampling) -> ml_collections.ConfigDict:
    m = small_model(COND)
    config = edm_cifar10_vp.edm_config(
        "cifar10", m.meta["precond_class"], m.meta["constructor_kwargs"], "amed_cifar10",
        checkpoint,
    )  # fmt: skip
    config.sampler.nfe = 3
    config.sampling.num_samples = 6
    config.sampling.batch_size = 3
    config.sampling.shard_size = 4
    config.sampling.update(sampling)
    return config


def test_eps_fn_is_edm_denoiser_as_eps(converted):
    """eps_fn(x, sigma) with the fixture's classes bound = (x - D) / sigma, D from EDM's code."""
    config = small_config(converted)
    loading.validate_model_and_data(config)
    schedule = build.schedule_from_config(config.sde)
    model = loading.load_model(config, "unused", schedule)
    assert model.num_classes == 10
    io = small_model(COND).io
    x, sigma = nhwc(io["x"]), io["sigma"]
    eps = model.eps_fn(jnp.asarray(io["labels"]))(x, jnp.asarray(sigma))
    want = (x - nhwc(io["D"])) / sigma[:, None, None, None]
    scale = np.abs(want).max(axis=(1, 2, 3))  # per row: eps of sigma = 0.002 is large
    err = np.abs(np.asarray(eps) - want).max(axis=(1, 2, 3)) / scale
    assert err.max() < 2e-4, err


def test_guidance_is_the_affine_combination_of_two_calls(converted):
    schedule = build.schedule_from_config(small_config(converted).sde)
    plain = loading.load_model(small_config(converted), "unused", schedule)
    guided = loading.load_model(small_config(converted, guidance_scale=2.5), "unused", schedule)
    io = small_model(COND).io
    x, sigma, labels = nhwc(io["x"]), jnp.asarray(io["sigma"]), jnp.asarray(io["labels"])
    e_c = plain.eps_fn(labels)(x, sigma)
    e_u = plain.eps_fn(None)(x, sigma)  # the null label: EDM's all-zero row
    got = guided.eps_fn(labels)(x, sigma)
    np.testing.assert_allclose(got, e_u + 2.5 * (e_c - e_u), rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(e_c - e_u).max()) > 1e-2  # the labels matter


def test_sample_mode_draws_classes_per_sample(converted, tmp_path):
    """--mode=sample on the conditional network: classes keyed by sample index (stored in
    samples.npz), results independent of the batch size, finite and in range."""
    runs = {}
    for batch in (3, 2):
        config = small_config(converted, batch_size=batch)
        workdir = str(tmp_path / f"b{batch}")
        out = sample_mode.run(config, workdir)
        with np.load(out["npz"]) as f:
            runs[batch] = {k: f[k] for k in f.files}
    want = np.asarray(ClassLabels(10, "random", seed=small_config(converted).seed)(np.arange(6)))
    np.testing.assert_array_equal(runs[3]["labels"], want)
    np.testing.assert_array_equal(runs[2]["labels"], want)
    assert runs[3]["samples"].shape == (6, 16, 16, 3) and runs[3]["samples"].dtype == np.uint8
    diff = np.abs(runs[3]["samples"].astype(int) - runs[2]["samples"].astype(int))
    assert diff.max() <= 1  # uint8 images; float rounding of another batch shape at most


def test_fixed_class_changes_the_samples_and_the_run_identity(converted, tmp_path):
    config = small_config(converted, labels="fixed", class_label=7, num_samples=2, batch_size=2)
    out = sample_mode.run(config, str(tmp_path))
    with np.load(out["npz"]) as f:
        np.testing.assert_array_equal(f["labels"], [7, 7])
    config.sampling.class_label = 3
    with pytest.raises(generation.DifferentRunError, match="class_label: 7 .*vs 3"):
        sample_mode.run(config, str(tmp_path))


def test_config_that_does_not_describe_the_checkpoint_is_refused(converted):
    config = small_config(converted)
    config.model.kwargs.model_channels = 32
    with pytest.raises(ConfigError, match=r"model_channels: 16 \(checkpoint\) vs 32 \(config\)"):
        loading.check_sampling_params(config, "unused")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sampling.labels", "all", "config.sampling.labels must be one of"),
        ("sampling.class_label", 10, r"config.sampling.class_label must be <= 9"),
        ("data.image_size", 32, "config.data.image_size must be 16 for this EDM network"),
        ("model.precond_class", "iDDPMPrecond", "config.model.precond_class must be one of"),
    ],
)
def test_bad_edm_fields_are_refused_by_name(converted, field, value, message):
    config = small_config(converted)
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ConfigError, match=message):
        loading.validate_model_and_data(config)


def test_published_configs_build_the_published_trees():
    """configs/edm_*.py describe the published networks exactly (names, shapes, counts)."""
    import json

    from configs import edm_imagenet64_cond
    from deis_jax.models.edm.params import check_published_tree

    here = os.path.join(os.path.dirname(__file__), "fixtures", "edm")
    for module, name in (
        (edm_cifar10_vp, "edm-cifar10-32x32-uncond-vp"),
        (edm_imagenet64_cond, "edm-imagenet-64x64-cond-adm"),
    ):
        config = module.get_config()
        with open(os.path.join(here, f"tree_{name}.json")) as f:
            check_published_tree(loading.build_model(config), json.load(f))
        assert loading.num_classes(config) == (1000 if "imagenet" in name else 0)


def test_unconditional_model_refuses_guidance():
    config = edm_cifar10_vp.get_config()
    config.sampling.guidance_scale = 2.0
    with pytest.raises(ConfigError, match="guidance_scale must be 1.0"):
        loading.validate_class_conditioning(config)


class TinyExtractor:
    """A fixed random projection of the uint8 images: 8 features, 4 logits (wiring only)."""

    name, weights_sha256, feature_dim, num_classes = "tiny_projection", "0" * 64, 8, 4

    def features_and_logits(self, images):
        flat = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
        proj = np.random.default_rng(0).normal(size=(flat.shape[1], 12)) / flat.shape[1] ** 0.5
        out = flat @ proj
        return out[:, :8], out[:, 8:]


def test_table_runs_end_to_end_on_the_conditional_fixture_model(converted, tmp_path):
    """``--mode=table`` with an EDM network, per-sample classes and EDM-style reference
    statistics (``mu``, ``sigma`` as in EDM's fid-refs files)."""
    from deis_jax.evaluation import fid
    from deis_jax.experiments import table

    reference = str(tmp_path / "imagenet-16x16.npz")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 8))
    np.savez(reference, mu=rng.normal(size=8), sigma=a @ a.T / 8)  # EDM's layout: float64
    mu, sigma, _ = fid.load_stats(reference)
    assert mu.shape == (8,) and sigma.shape == (8, 8)

    config = small_config(converted)
    config.table = "ersde_imagenet64"
    ev = config.eval
    ev.reference_stats, ev.num_samples, ev.batch_size = reference, 6, 6
    ev.methods, ev.nfes, ev.inception_score, ev.rmse = (
        ("ER-SDE-Solver-3", "iPNDM"),
        (10,),
        False,
        False,
    )
    ev.export = str(tmp_path / "export")
    ev.inception_weights = str(tmp_path / "unused_weights.npz")  # replaced by TinyExtractor
    open(ev.inception_weights, "wb").close()
    records = table.run(config, str(tmp_path / "w"), extractor=TinyExtractor())
    assert [r["method"] for r in records] == ["ER-SDE-Solver-3", "iPNDM"]
    assert all(np.isfinite(r["value"]) and not r.get("failed") for r in records)
    md = open(ev.export + ".md").read()
    assert "ER-SDE-Solver-3" in md and "3.45" not in md  # the paper's NFE-20 cell is not run
    config.sampling.labels = "cycle"  # other classes: other cells, not the cached ones
    again = table.run(config, str(tmp_path / "w"), extractor=TinyExtractor())
    assert [r["value"] for r in again] != [r["value"] for r in records]


def test_fit_mode_takes_a_class_conditional_network_and_checks_its_labels(converted):
    """``--mode=fit`` validates a class-conditional network (each starting point gets a
    class: tests/test_conditional_fit.py) and refuses a bad ``sampling.labels`` by name."""
    from configs import amed_cifar10
    from deis_jax.experiments.modes import get_mode

    config = amed_cifar10.get_config("edm")
    m = small_model(COND)
    config.model.precond_class = m.meta["precond_class"]
    config.model.kwargs = ml_collections.ConfigDict(m.meta["constructor_kwargs"])
    config.data.image_size = 16
    config.sampling.checkpoint = converted
    assert get_mode("fit").validate(config).cells
    config.sampling.labels = "all"
    with pytest.raises(ConfigError, match="config.sampling.labels must be one of"):
        get_mode("fit").validate(config)
