"""The model-family registry: every config.model.name belongs to one registered family, the
loader asks that family, and a new family registers without touching the others."""

from __future__ import annotations

import pytest

from configs import edm_cifar10_vp, vpsde_cifar10, vpsde_digits
from deis_jax import models
from deis_jax.common.checks import ConfigError
from deis_jax.models import loading, registry
from deis_jax.models.edm.family import EdmFamily
from deis_jax.models.score_sde.family import ScoreSdeFamily


def test_each_name_has_one_family():
    assert models.model_names() == ("ncsnpp", "ddpm", "edm")
    assert isinstance(models.family_of(vpsde_cifar10.get_config()), ScoreSdeFamily)
    assert isinstance(models.family_of(vpsde_digits.get_config()), ScoreSdeFamily)
    assert isinstance(models.family_of(edm_cifar10_vp.get_config()), EdmFamily)


def test_unknown_name_lists_the_registered_ones():
    config = vpsde_digits.get_config()
    config.model.name = "latent"
    with pytest.raises(ConfigError, match=r"model.name must be one of \['ncsnpp', 'ddpm', 'edm'\]"):
        models.family_of(config)


def test_what_the_loader_asks_the_family():
    vp, edm = vpsde_cifar10.get_config(), edm_cifar10_vp.get_config()
    assert loading.model_prediction(vp) == "eps" and loading.model_prediction(edm) == "x0"
    assert loading.num_classes(vp) == 0 and loading.num_classes(edm) == 0
    assert ScoreSdeFamily.trainable and not EdmFamily.trainable


def test_a_name_registers_once(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", list(registry._FAMILIES))

    class Latent(ScoreSdeFamily):
        model_names = ("latent",)

    registry.register_family(Latent())
    assert registry.model_names()[-1] == "latent"
    with pytest.raises(ValueError, match="registered already"):
        registry.register_family(Latent())
