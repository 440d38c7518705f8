"""Import of the published score_sde checkpoints (Song et al., 2021).

The published checkpoints are single msgpack files ``checkpoint_<N>`` written by flax 0.3.1's
``save_checkpoint`` (``to_state_dict`` of score_sde's training state, then
``msgpack_serialize``). Their top level is ``{step, optimizer: {target, state: {step,
param_states}}, lr, model_state, ema_rate, params_ema, rng}`` (``lr`` and ``ema_rate`` plain
floats); sampling uses ``params_ema`` (``optimizer.target`` are the raw, non-averaged weights).
:func:`load_score_sde_params` reads one with ``flax.serialization.msgpack_restore`` (no
``flax.optim`` needed) and picks the parameters. flax 0.3 stored GroupNorm's ``scale`` and
``bias`` as ``(1, 1, 1, C)``, today's flax as ``(C,)``; those leaves are reshaped
(:func:`convert_old_layout`, an exact, counted conversion). The tree is then checked against the
one the model expects (``jax.eval_shape`` of its init, so nothing is computed); a mismatch is a
``ValueError`` that names the leaf, both shapes and the likely cause: a different model config or
an unknown file layout (``deis_jax.models.checkpoints.check_params_tree``).

Download the checkpoints from the "Pretrained checkpoints" section of
https://github.com/yang-song/score_sde (Google Drive) and put them under ``checkpoints/``,
e.g. ``checkpoints/vp/cifar10_ddpmpp_deep_continuous/checkpoint_8``. Nothing is downloaded at
run time. ``scripts/convert_score_sde_checkpoint.py`` converts one once into the project's
format (``deis_jax.models.checkpoints.save_params``), read back by :func:`load_converted_params`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import msgpack
import numpy as np
from flax import serialization

from deis_jax.models.checkpoints import (
    OLD_NORM_LAYOUT,
    check_params_tree,
    flatten_tree,
    leaf_shape,
    load_params,
    old_norm_channels,
)
from deis_jax.models.score_sde import abstract_params
from deis_jax.models.score_sde.configs import get_model_config

SCORE_SDE_URL = "https://github.com/yang-song/score_sde"
SCORE_SDE_LAYOUT = ("step", "optimizer", "lr", "model_state", "ema_rate", "params_ema", "rng")

__all__ = [
    "SCORE_SDE_LAYOUT",
    "SCORE_SDE_URL",
    "check_score_sde_params",
    "convert_old_layout",
    "import_score_sde_params",
    "load_converted_params",
    "load_score_sde_params",
    "load_score_sde_state",
    "resolve_model_config",
]


def convert_old_layout(params: Mapping, expected: Any) -> tuple[dict, dict[str, int]]:
    """Reshape flax 0.3's ``(1, 1, 1, C)`` norm parameters to the ``(C,)`` the model expects.

    flax <= 0.3 (which wrote the published score_sde checkpoints) created GroupNorm's ``scale``
    and ``bias`` with their broadcast shape ``(1, 1, 1, C)``; today's flax creates ``(C,)``.
    The values are the same, so the reshape is exact. Only a leaf that is ``(1, 1, 1, C)`` where
    ``expected`` has ``(C,)`` at the same path (same ``C``) is touched; anything else is returned
    as is, for :func:`check_params_tree` to judge.

    Returns:
      ``(params, converted)``: the tree (nested dicts) and the conversions applied with their
      leaf counts, ``{'old_groupnorm_layout': n}`` (``{}`` when nothing was converted).
    """
    want = flatten_tree(expected)
    count = 0

    def convert(tree: Any, path: str) -> Any:
        nonlocal count
        if isinstance(tree, Mapping):
            return {k: convert(v, f"{path}/{k}" if path else str(k)) for k, v in tree.items()}
        target = leaf_shape(want.get(path))
        if target is None or len(target) != 1 or old_norm_channels(leaf_shape(tree)) != target[0]:
            return tree
        count += 1
        return np.reshape(np.asarray(tree), target)

    converted = convert(params, "")
    return converted, ({OLD_NORM_LAYOUT: count} if count else {})


def resolve_model_config(model_config: Any):
    """A known config name (``deis_jax.models.score_sde.KNOWN_MODEL_CONFIGS``) or a config."""
    if isinstance(model_config, str):
        return get_model_config(model_config)
    return model_config


def _missing_score_sde_file(path: str, checkpoint_dir: str | None = None) -> FileNotFoundError:
    hint = ""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.startswith("checkpoint_"))
        hint = (
            f" '{path}' is a directory; pass one checkpoint file"
            + (f" (found: {', '.join(found)})" if found else "")
            + "."
        )
    folder = checkpoint_dir or "vp/cifar10_ddpmpp_deep_continuous"
    return FileNotFoundError(
        f"score_sde checkpoint file not found: '{path}'.{hint} Download it from the "
        f"'Pretrained checkpoints' section of {SCORE_SDE_URL} (Google Drive folder "
        f"{folder}/, file checkpoint_<N>) and put it under checkpoints/, e.g. "
        f"checkpoints/{folder}/checkpoint_8; then convert it once with "
        "scripts/convert_score_sde_checkpoint.py."
    )


def _array_placeholder(code: int, data: bytes) -> Any:
    """msgpack ext hook: a flax array as a zero-stride array of its shape and dtype (no
    memory for its values); other ext types as flax decodes them."""
    if code != serialization._MsgpackExtType.ndarray:
        return serialization._msgpack_ext_unpack(code, data)
    shape, dtype_name, _ = msgpack.unpackb(data, raw=True)
    dtype = serialization._dtype_from_name(dtype_name)
    return np.broadcast_to(np.zeros((), dtype), tuple(shape))


def _read_shapes_only(path: str) -> Any:
    """The tree of a flax msgpack file with :func:`_array_placeholder` leaves, streamed (the
    file is read once, never held whole)."""
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(
            f, ext_hook=_array_placeholder, raw=False, strict_map_key=False, max_buffer_size=0
        )
        state = unpacker.unpack()
    return serialization._unchunk_array_leaves_in_place(state)


def load_score_sde_state(
    path: str | os.PathLike, checkpoint_dir: str | None = None, *, shapes_only: bool = False
) -> dict:
    """Read a score_sde ``checkpoint_<N>`` msgpack file into a nested dict (no checks).

    ``checkpoint_dir`` (e.g. ``'vp/cifar10_ddpmpp_deep_continuous'``) only makes the
    missing-file message more specific. ``shapes_only``: every array is a zero-stride
    placeholder of its shape and dtype (a start-up check, in little memory).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _missing_score_sde_file(path, checkpoint_dir)
    try:
        if shapes_only:
            state = _read_shapes_only(path)
        else:
            with open(path, "rb") as f:
                state = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise ValueError(f"'{path}' is not a readable score_sde checkpoint (msgpack): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' does not hold a score_sde state dict")
    return state


def _score_sde_params(state: dict, path: str, use_ema: bool, expected: Any) -> tuple[Mapping, str]:
    """``(params, name)``: ``state['params_ema']`` or ``state['optimizer']['target']``."""
    name = "params_ema" if use_ema else "optimizer.target"
    optimizer = state.get("optimizer")
    candidates = {
        "params_ema": state.get("params_ema"),
        "optimizer.target": optimizer.get("target") if isinstance(optimizer, Mapping) else None,
    }
    params = candidates[name]
    if isinstance(params, Mapping):
        return params, name
    problem = f"has no '{name}'" if params is None else f"has a {type(params).__name__} as '{name}'"
    hints = []
    if set(state) & set(expected):
        hints.append(
            "its top level holds the model's modules: it is a bare parameter tree, not a "
            "score_sde training state"
        )
    other = "optimizer.target" if use_ema else "params_ema"
    if isinstance(candidates[other], Mapping):
        flag = "use_ema=False (--use_target)" if use_ema else "use_ema=True (no --use_target)"
        hints.append(f"it has '{other}': pass {flag} to load that")
    keys = sorted(state)
    shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
    raise ValueError(
        f"'{path}' {problem}, so it is not a score_sde checkpoint as published (top-level keys: "
        f"{shown}; score_sde writes {', '.join(SCORE_SDE_LAYOUT)}, the parameters in "
        f"'params_ema' and 'optimizer.target')" + "".join(f"; {h}" for h in hints) + "."
    )


def _number(value: Any) -> int | float | None:
    """A plain number from a Python number or a one-element array (None for anything else)."""
    if value is None:
        return None
    array = np.asarray(value)
    return array.item() if array.size == 1 and array.dtype.kind in "iuf" else None


def import_score_sde_params(
    path: str | os.PathLike, model_config: Any, use_ema: bool = True, *, shapes_only: bool = False
) -> tuple[dict, dict]:
    """Parameters of a published score_sde checkpoint and where they came from.

    The file is read as flax 0.3.1 wrote it (module docstring): ``params_ema`` or
    ``optimizer.target`` is taken, its ``(1, 1, 1, C)`` GroupNorm parameters are reshaped to
    ``(C,)`` (:func:`convert_old_layout`) and the tree is checked against ``model_config``
    (:func:`check_params_tree`).

    ``shapes_only`` reads only the arrays' shapes and dtypes (:func:`load_score_sde_state`):
    every check is made, the returned arrays are zero-stride placeholders.

    Returns:
      ``(params, provenance)``: the ``params`` tree (nested dict of host numpy arrays) and a
      JSON-able dict ``{'source_params': 'params_ema' | 'optimizer.target', 'source_step':
      int | None, 'source_ema_rate': float | None, 'converted_leaves': {...}}`` (the
      conversions of :func:`convert_old_layout`; ``{}`` for a file in today's layout).
    """
    path = os.fspath(path)
    config = resolve_model_config(model_config)
    checkpoint_dir = config.get("checkpoint_dir") if hasattr(config, "get") else None
    state = load_score_sde_state(path, checkpoint_dir, shapes_only=shapes_only)
    expected = abstract_params(config)
    params, name = _score_sde_params(state, path, use_ema, expected)
    params, converted = convert_old_layout(params, expected)
    check_params_tree(params, expected, f"score_sde {name}")
    provenance = {
        "source_params": name,
        "source_step": _number(state.get("step")),
        "source_ema_rate": _number(state.get("ema_rate")),
        "converted_leaves": converted,
    }
    return jax.tree.map(np.asarray, params), provenance


def load_score_sde_params(path: str | os.PathLike, model_config: Any, use_ema: bool = True) -> dict:
    """Parameters of a published score_sde checkpoint, checked against ``model_config``.

    Args:
      path: a score_sde ``checkpoint_<N>`` file.
      model_config: a known config name (e.g. ``'vp_cifar10_ddpmpp_deep_continuous'``) or a
        config accepted by :func:`deis_jax.models.score_sde.get_model`.
      use_ema: take ``params_ema`` (the default, what score_sde samples with); ``False``
        takes ``optimizer.target``.

    Returns:
      The ``params`` tree (nested dict of host numpy arrays) for
      ``model.apply({'params': params}, ...)``, GroupNorm parameters in today's ``(C,)``
      layout (see :func:`import_score_sde_params`, which also says where they came from).

    Raises:
      FileNotFoundError: the file is missing (the message says what to download).
      ValueError: not a score_sde state, or the tree does not match the model; the message
        names the leaf, both shapes and whether it looks like another model config or an
        unknown file layout.
    """
    return import_score_sde_params(path, model_config, use_ema)[0]


def load_converted_params(path: str | os.PathLike, model_config: Any) -> dict:
    """Parameters converted by ``scripts/convert_score_sde_checkpoint.py``
    (``deis_jax.models.checkpoints.load_params``), checked against ``model_config`` (a known name
    or a config)."""
    return load_params(path, abstract_params(resolve_model_config(model_config)))


def check_score_sde_params(path: str | os.PathLike, model_config: Any, use_ema: bool = True):
    """Every check of :func:`load_score_sde_params` (a readable score_sde state whose
    parameters fit ``model_config``), reading only the arrays' shapes: ``ValueError`` /
    ``FileNotFoundError`` as it raises them."""
    import_score_sde_params(path, model_config, use_ema, shapes_only=True)
