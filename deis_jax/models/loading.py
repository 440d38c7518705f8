"""From an experiment config to a network and its parameters, ready to sample with.

    model = loading.load_model(config, workdir, schedule)   # a LoadedModel
    eps_fn = model.bind(model.params)                       # x, t -> eps, for any sampler
    eps, feats = wrappers.eps_with_features(eps_fn, x, t)   # and the bottleneck feature (AMED)

Every question about the network goes to the family of ``config.model.name``
(:func:`deis_jax.models.registry.family_of`); nothing here tells families apart.

* :func:`build_model` -- the Flax network of ``config.model``.
* :func:`model_prediction` -- what the network outputs (``eps`` / ``score`` / ``x0`` ...).
* :func:`validate_model_and_data` -- the config checks of ``config.data`` and ``config.model``
  (``ConfigError`` naming the field), shared by the train, sample and table modes.
* :func:`load_sampling_params` -- ``config.sampling.checkpoint`` (a converted score_sde
  directory or a raw score_sde ``checkpoint_<N>`` file) or else the EMA parameters of the
  latest training checkpoint under ``<workdir>/checkpoints``. :func:`check_sampling_params`
  is its cheap part, run by ``main.py`` before any network is built: a missing checkpoint is
  a :class:`CheckpointNotFoundError` whose one line says how to get one for this config
  (train the digits model; or what the model's family offers, e.g. a published score_sde
  network to convert),
  an unreadable one a ``CheckpointError`` naming it. :func:`verify_sampling_params` adds
  what reading the file's structure tells -- garbage, every training checkpoint damaged,
  another network's parameters (compared with ``jax.eval_shape`` of the network's init) --
  still before any network is built.
* :func:`load_model` -- the network, its parameters (those, or an untrained network's) and an
  ``identity`` for result caches (which weights, with ``identity.tree_digest`` of their bytes).

The parameters stay separate from the network (``bind(params)``) so that jitted samplers take
them as arguments instead of baking them into the executable as constants.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from deis_jax.common import checkpoint_store, data
from deis_jax.common.checkpoint_store import CheckpointError
from deis_jax.common.checks import (
    ConfigError,
    first_line,
    get_field,
    require_choice,
    require_number,
    require_seed,
)
from deis_jax.common.identity import tree_digest
from deis_jax.common.precision import model_identity
from deis_jax.models import checkpoints, family_of
from deis_jax.models.checkpoints import CheckpointNotFoundError
from deis_jax.sampling import class_labels
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.sampling.wrappers import EpsFn, eps_fn_from_model

PARAMS_SOURCES = ("checkpoint", "random")
BOOL = (True, False)


def build_model(config) -> nn.Module:
    """The Flax network of ``config`` (``ValueError`` / ``ConfigError`` naming a bad
    ``model.*`` field), built by the family of ``config.model.name``."""
    return family_of(config).build(config)


def model_prediction(config) -> str:
    """What the network outputs (``deis_jax.sampling.wrappers.PREDICTIONS``)."""
    return family_of(config).prediction(config)


def image_shape(config) -> tuple[int, int, int]:
    """``(H, W, C)`` of one image of ``config.data``."""
    size = int(config.data.image_size)
    return size, size, int(config.data.num_channels)


def validate_model_and_data(config) -> None:
    """Check ``config.seed``, ``config.data`` and ``config.model`` (``ConfigError`` naming
    the field)."""
    require_seed(config)
    name = require_choice(config, "data.name", data.DATASETS)
    require_number(config, "data.image_size", integer=True, minimum=1)
    channels = require_number(config, "data.num_channels", integer=True, minimum=1)
    if channels != data.NUM_CHANNELS[name]:
        raise ConfigError(
            f"config.data.num_channels must be {data.NUM_CHANNELS[name]} for dataset "
            f"{name!r}, got {channels!r}"
        )
    require_choice(config, "data.centered", BOOL)
    require_choice(config, "data.random_flip", BOOL)
    get_field(config, "model")
    validate_class_conditioning(config)
    family_of(config).validate(config)


def num_classes(config) -> int:
    """The classes of a class-conditional network (0: unconditional)."""
    return family_of(config).num_classes(config)


def validate_class_conditioning(config) -> None:
    """``config.sampling.labels`` / ``class_label`` / ``guidance_scale`` (read only for a
    class-conditional network, see ``deis_jax.sampling.class_labels``)."""
    sampling = config.get("sampling") or {}
    classes = num_classes(config)
    if classes:
        require_choice(config, "sampling.labels", class_labels.LABEL_MODES)
        require_number(config, "sampling.class_label", integer=True, minimum=0, maximum=classes - 1)
        require_number(config, "sampling.guidance_scale")
    elif sampling.get("guidance_scale", 1.0) not in (None, 1.0):
        raise ConfigError(
            "config.sampling.guidance_scale must be 1.0 (or None) for an unconditional "
            f"network, got {sampling.get('guidance_scale')!r}"
        )


def class_labels_of(config, model: LoadedModel, seed: int) -> class_labels.ClassLabels | None:
    """The classes the samples of a run are drawn for (None: an unconditional model)."""
    if not model.num_classes:
        return None
    return class_labels.ClassLabels(
        num_classes=model.num_classes,
        mode=config.sampling.labels,
        class_label=int(config.sampling.class_label),
        seed=int(seed),
    )


# --- parameters ---------------------------------------------------------------------------


def _missing_training_checkpoint(config, directory: str) -> CheckpointNotFoundError:
    """What to do without a training checkpoint, for this config: the digits model trains in
    minutes; the family says what else can be had (e.g. a published network to convert)."""
    workdir = os.path.dirname(directory)
    if config.data.name == "digits":
        train = (
            f"train the digits model first (about 11 minutes on 2 CPU cores): python main.py "
            f"--config=configs/vpsde_digits.py --workdir={workdir} --mode=train"
        )
    else:
        train = (
            f"train one first: python main.py --config=<this config> --workdir={workdir} "
            f"--mode=train"
        )
    other = family_of(config).without_checkpoint(config)
    return CheckpointNotFoundError(f"no training checkpoint in '{directory}': {train}; {other}.")


def check_sampling_params(config, workdir: str) -> None:
    """The parameters :func:`load_sampling_params` will read are there -- a cheap check, made
    before any network is built: ``config.sampling.checkpoint`` passes its family's checks
    (e.g. a raw score_sde file, or a converted directory with its
    ``deis_jax_metadata.json``), else ``<workdir>/checkpoints`` holds a step.
    ``CheckpointNotFoundError`` (one line: the path and what to do) otherwise."""
    path = config.sampling.get("checkpoint")
    family_of(config).check_checkpoint(config, path)
    if not path and latest_step(workdir) is None:
        raise _missing_training_checkpoint(
            config, os.path.abspath(os.path.join(workdir, "checkpoints"))
        )


def _unloadable(path: str, err: BaseException) -> CheckpointError:
    """``config.sampling.checkpoint`` cannot be used: one line naming it, why and what to do."""
    again = "download it again" if os.path.isfile(path) else "convert it again"
    return CheckpointError(
        f"config.sampling.checkpoint: '{path}' cannot be loaded ({first_line(err)}): it is "
        f"damaged or holds another network than config.model; {again} or fix config.model"
    )


def verify_sampling_params(config, workdir: str) -> None:
    """:func:`check_sampling_params`, then what the checkpoint's structure tells, read without
    its arrays and compared with ``jax.eval_shape`` of the network's init (nothing built or
    compiled): a raw score_sde file must parse and hold the model's parameter tree, a
    converted checkpoint's Orbax metadata must read and match it, and some training
    checkpoint must be intact with EMA parameters that match it
    (``checkpoint_store.restorable_metadata``). ``CheckpointError`` naming the checkpoint, as
    loading it would raise -- but before any network is built (what ``main.py`` runs)."""
    check_sampling_params(config, workdir)
    family = family_of(config)
    path = config.sampling.get("checkpoint")
    if not path:

        def fits(folder: str, tree: Any) -> None:
            expected = family.abstract_params(config, build_model(config))
            checkpoints.check_params_tree(tree["ema_params"], expected, f"checkpoint {folder}")

        checkpoint_store.restorable_metadata(os.path.join(workdir, "checkpoints"), fits)
        return
    try:
        family.verify_checkpoint(config, path, build_model(config))
    except Exception as err:  # any failure to read it: the file is unusable
        raise _unloadable(path, err) from err


def load_sampling_params(config, workdir: str, model: nn.Module | None = None) -> Any:
    """The parameters to sample with: ``config.sampling.checkpoint`` when set (loaded by its
    family, e.g. a converted directory or a raw score_sde ``checkpoint_<N>`` file's
    ``params_ema``), else the EMA parameters of the latest intact checkpoint in
    ``<workdir>/checkpoints`` (restored as saved: no optimizer is built). ``model`` (default:
    :func:`build_model`) gives the tree to check against. A missing checkpoint is a
    ``CheckpointNotFoundError`` saying how to get one (:func:`check_sampling_params`, before
    any network is built); one that cannot be read or does not fit the model a
    ``CheckpointError`` naming it."""
    check_sampling_params(config, workdir)
    path = config.sampling.get("checkpoint")
    model = build_model(config) if model is None else model
    if path:
        try:
            return family_of(config).load_checkpoint(config, path, model)
        except ConfigError:
            raise
        except Exception as err:  # any failure to read it: the file is unusable
            raise _unloadable(path, err) from err
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    saved = checkpoint_store.restorable_metadata(directory)  # CheckpointError: none intact
    if saved is None:
        raise _missing_training_checkpoint(config, directory)
    mngr = checkpoint_store.checkpoint_manager(directory)
    try:
        state = checkpoint_store.restore_state(mngr, saved[1])
        logging.info("restored EMA parameters from %s at step %d", directory, int(state["step"]))
    finally:
        mngr.close()
    expected = family_of(config).abstract_params(config, model)
    try:
        checkpoints.check_params_tree(state["ema_params"], expected, f"checkpoint {saved[0]}")
    except ValueError as err:
        raise CheckpointError(
            f"checkpoint {saved[0]} is intact but cannot be restored into this model "
            f"({first_line(err)}); check config.model, or use another --workdir"
        ) from err
    return state["ema_params"]


def latest_step(workdir: str) -> int | None:
    """The latest training checkpoint step under ``<workdir>/checkpoints`` (None: none)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
    return max(steps) if steps else None


# --- the model to sample with -------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    """A noise prediction with its parameters kept apart: ``bind(params) -> eps_fn(x, t)``
    (pass ``params`` into the jitted sampler as an argument); ``identity`` (JSON-able) says
    which network and weights these are, for result caches. The eps functions of
    :func:`load_model` also give the network's bottleneck feature,
    ``deis_jax.sampling.wrappers.eps_with_features(eps_fn, x, t) -> (eps, features)``."""

    bind: Callable[..., EpsFn]
    params: Any
    identity: dict
    num_classes: int = 0

    def eps_fn(self, labels: jax.Array | None = None) -> EpsFn:
        """The noise prediction with :attr:`params` bound (and, for a class-conditional
        network, the int ``labels`` of a fixed batch, shape ``(B,)``). Samplers and fitters
        take the unbound one and pass the rows' labels with each call
        (``eps_fn(x, t, labels=...)``, ``deis_jax.sampling.wrappers``), so that they follow
        the rows through minibatches and concatenated calls."""
        return self.bind(self.params) if labels is None else self.bind(self.params, labels)


def load_model(
    config, workdir: str, schedule: NoiseSchedule, *, params: str = "checkpoint"
) -> LoadedModel:
    """The network of ``config`` as a noise prediction under ``schedule``.

    ``params='checkpoint'``: :func:`load_sampling_params`; ``'random'``: an untrained network
    initialised from ``PRNGKey(config.seed)`` (smoke tests only)."""
    if params not in PARAMS_SOURCES:
        raise ValueError(f"params must be one of {PARAMS_SOURCES}, got {params!r}")
    family = family_of(config)
    model = family.build(config)
    if params == "random":
        logging.warning("config.eval.params='random': an UNTRAINED network (smoke test only)")
        key = jax.random.PRNGKey(config.seed)
        dummy = jnp.zeros((1, *image_shape(config)))
        values = model.init(key, dummy, jnp.ones((1,)), train=False)["params"]
        identity: dict = {"params": "random", "seed": config.seed}
    else:
        values = load_sampling_params(config, workdir, model)
        ckpt = config.sampling.get("checkpoint")
        identity = {"checkpoint": ckpt} if ckpt else {"workdir_step": latest_step(workdir)}
        identity["params_sha256"] = tree_digest(values)
    identity["model"] = model_identity(config.model.to_dict())
    prediction = family.prediction(config)

    def bind(p, labels: jax.Array | None = None) -> EpsFn:
        """``eps_fn(x, t)`` of parameters ``p`` (and the batch's class ``labels``)."""
        return eps_fn_from_model(family.model_fn(config, model, p, labels), schedule, prediction)

    return LoadedModel(bind, values, identity, family.num_classes(config))


def describe_model(identity: dict) -> str:
    """One line saying which weights a :class:`LoadedModel` ``identity`` names."""
    if identity.get("checkpoint"):
        where = f"checkpoint {identity['checkpoint']}"
    elif identity.get("workdir_step") is not None:
        where = f"workdir EMA parameters at step {identity['workdir_step']}"
    else:
        where = str(identity.get("params") or identity.get("model") or "given model")
    digest = identity.get("params_sha256")
    return where + (f" (params sha256 {digest[:12]}…)" if digest else "")
