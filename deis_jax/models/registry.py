"""Registry of model families: ``config.model.name`` -> the family that builds and loads it.

A model family is one kind of network (score_sde's NCSN++/DDPM++/DDPM, EDM's preconditioned
U-Nets): it builds the Flax network from the experiment config's ``model`` block, checks and
loads the published weights it was converted from, says what the network predicts and how it
is conditioned, and calls the network the way samplers need. ``deis_jax.models.loading`` asks
the family of a config for each of these; nothing outside a family's folder tells families
apart. A new family is one folder with a class that satisfies :class:`ModelFamily`, registered
with :func:`register_family` in ``deis_jax/models/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax

from deis_jax.common.checks import ConfigError

# model_fn(x, cond, *, features=False) -> out, or (out, features) with features=True; a
# class-conditional one also model_fn(x, cond, *, labels=...) with the rows' int classes (B,).
ModelFn = Callable[..., Any]


class ModelFamily(Protocol):
    """What every model family provides (``config``: an experiment config with ``model`` and
    ``data`` blocks and, for loading, ``sampling.checkpoint``)."""

    #: the ``config.model.name`` values this family builds
    model_names: tuple[str, ...]
    #: whether ``--mode=train`` can train its networks
    trainable: bool

    def validate(self, config) -> None:
        """``ConfigError`` naming a bad ``config.model`` field or a ``config.data`` field the
        network disagrees with."""

    def build(self, config) -> nn.Module:
        """The Flax network of ``config.model`` (``ValueError`` / ``ConfigError`` naming a bad
        field)."""

    def prediction(self, config) -> str:
        """What the network outputs: one of ``deis_jax.sampling.wrappers.PREDICTIONS``."""

    def num_classes(self, config) -> int:
        """The classes of a class-conditional network (0: unconditional)."""

    def abstract_params(self, config, net: nn.Module) -> Any:
        """The parameter tree of ``net`` as ``jax.ShapeDtypeStruct`` leaves (no compute)."""

    def check_checkpoint(self, config, path: str | None) -> None:
        """The cheap checks of ``config.sampling.checkpoint`` (``path``; None: unset), made
        before any network is built; ``CheckpointNotFoundError`` / ``ConfigError`` saying
        what to do."""

    def verify_checkpoint(self, config, path: str, net: nn.Module) -> None:
        """What reading the structure of ``path`` (not its arrays) tells: raises when it is
        unreadable or holds another network than ``net``."""

    def load_checkpoint(self, config, path: str, net: nn.Module) -> Any:
        """The parameters of ``net`` stored at ``path``, checked against its tree."""

    def without_checkpoint(self, config) -> str:
        """What else can be had when neither ``config.sampling.checkpoint`` nor a training
        checkpoint is there (one clause, starting ``or ...``, of the error message)."""

    def model_fn(self, config, net: nn.Module, params: Any, labels: jax.Array | None) -> ModelFn:
        """``net`` with ``params`` (and the batch's int class ``labels``, None for none) as
        ``model_fn(x, cond, *, features=False)``: a ``jax.tree_util.Partial`` whose leaves
        are the parameters. A class-conditional network's ``model_fn`` also takes the rows'
        classes per call, ``model_fn(x, cond, labels=...)`` (overriding bound ones)."""


_FAMILIES: list[ModelFamily] = []


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family``; its model names must be new."""
    taken = set(model_names()) & set(family.model_names)
    if taken:
        raise ValueError(f"model names {sorted(taken)} are registered already")
    _FAMILIES.append(family)
    return family


def model_names() -> tuple[str, ...]:
    """Every registered ``config.model.name``, in registration order."""
    return tuple(name for family in _FAMILIES for name in family.model_names)


def family_of(config) -> ModelFamily:
    """The family whose network ``config.model.name`` names (``ConfigError`` listing the
    registered names for another)."""
    name = config.model.get("name")
    for family in _FAMILIES:
        if name in family.model_names:
            return family
    raise ConfigError(f"config.model.name must be one of {list(model_names())}, got {name!r}")
