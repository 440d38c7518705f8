"""Model parameters on disk: import of score_sde checkpoints and the project's own format.

**score_sde checkpoints.** The published checkpoints (Song et al., 2021) are single msgpack
files ``checkpoint_<N>`` written by flax 0.3's ``save_checkpoint``. They hold the training state
``{step, optimizer: {target, state}, lr, model_state, ema_rate, params_ema, rng}``; sampling uses
``params_ema`` (``optimizer.target`` are the raw, non-averaged weights).
:func:`load_score_sde_params` reads one with ``flax.serialization.msgpack_restore`` (no
``flax.optim`` needed), picks the parameters and checks them against the tree the model
expects (``jax.eval_shape`` of its init, so nothing is computed), failing with a
``ValueError`` that names the first mismatching path.

Download the checkpoints from the "Pretrained checkpoints" section of
https://github.com/yang-song/score_sde (Google Drive) and put them under ``checkpoints/``,
e.g. ``checkpoints/vp/cifar10_ddpmpp_deep_continuous/checkpoint_8``. Nothing is downloaded at
run time.

**Converted format.** :func:`save_params` / :func:`load_params` store a parameter tree as an
Orbax checkpoint directory written with ``orbax.checkpoint.StandardCheckpointer`` (the same
library the training loop uses for its checkpoints), plus a small JSON sidecar
``deis_jax_metadata.json`` inside that directory (model config, source file and its sha256,
parameter count). Orbax was chosen over a plain msgpack file because it is the project's
checkpoint library, reads arrays lazily per leaf instead of one big blob and can later
restore directly into a sharded layout. Leaves are saved as host numpy arrays so that a
checkpoint restores on any device topology. Restoring does not pass a target tree to Orbax
(it does not reject shape mismatches); instead the restored tree is checked with
:func:`check_params_tree`, which gives a precise error.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from deis_jax.models import abstract_params
from deis_jax.models.configs import get_model_config

SCORE_SDE_URL = "https://github.com/yang-song/score_sde"
METADATA_FILE = "deis_jax_metadata.json"
FORMAT_NAME = "deis_jax.params"
FORMAT_VERSION = 1

__all__ = [
    "check_params_tree",
    "flatten_tree",
    "load_params",
    "load_params_metadata",
    "load_score_sde_params",
    "load_score_sde_state",
    "resolve_model_config",
    "save_params",
]


# ---------------------------------------------------------------------------- tree helpers
def flatten_tree(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into ``{'a/b/c': leaf}`` (slash-joined paths)."""
    flat: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            path = f"{prefix}/{key}" if prefix else str(key)
            flat.update(flatten_tree(value, path))
        if not tree and prefix:
            flat[prefix] = {}
    else:
        flat[prefix] = tree
    return flat


def _shape(leaf: Any) -> tuple[int, ...] | None:
    shape = getattr(leaf, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def check_params_tree(params: Any, expected: Any, what: str = "checkpoint") -> None:
    """Raise ``ValueError`` unless ``params`` has exactly the paths and shapes of ``expected``.

    Paths are compared in sorted order; the message names the first mismatching path (a
    parameter missing from ``params``, an unexpected extra one, or a shape mismatch with both
    shapes) and counts all mismatches.
    """
    got, want = flatten_tree(params), flatten_tree(expected)
    missing = unexpected = wrong_shape = 0
    first = None
    for path in sorted(set(got) | set(want)):
        if path not in got:
            missing += 1
            msg = f"missing parameter '{path}' (the model expects shape {_shape(want[path])})"
        elif path not in want:
            unexpected += 1
            msg = f"unexpected parameter '{path}' (shape {_shape(got[path])}) not in the model"
        elif _shape(got[path]) != _shape(want[path]):
            wrong_shape += 1
            msg = (
                f"shape mismatch at '{path}': {what} has {_shape(got[path])}, "
                f"the model expects {_shape(want[path])}"
            )
        else:
            continue
        first = first or msg
    if first is not None:
        raise ValueError(
            f"{what} parameters do not match the model: {first} "
            f"({missing} missing, {unexpected} unexpected, {wrong_shape} with the wrong shape; "
            f"is the model config the one the checkpoint was trained with?)"
        )


def resolve_model_config(model_config: Any):
    """A known config name (see ``deis_jax.models.KNOWN_MODEL_CONFIGS``) or a config as is."""
    if isinstance(model_config, str):
        return get_model_config(model_config)
    return model_config


# ------------------------------------------------------------------------- score_sde import
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


def load_score_sde_state(path: str | os.PathLike, checkpoint_dir: str | None = None) -> dict:
    """Read a score_sde ``checkpoint_<N>`` msgpack file into a nested dict (no checks).

    ``checkpoint_dir`` (e.g. ``'vp/cifar10_ddpmpp_deep_continuous'``) only makes the
    missing-file message more specific.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _missing_score_sde_file(path, checkpoint_dir)
    with open(path, "rb") as f:
        data = f.read()
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise ValueError(f"'{path}' is not a readable score_sde checkpoint (msgpack): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' does not hold a score_sde state dict")
    return state


def load_score_sde_params(path: str | os.PathLike, model_config: Any, use_ema: bool = True) -> dict:
    """Parameters of a published score_sde checkpoint, checked against ``model_config``.

    Args:
      path: a score_sde ``checkpoint_<N>`` file.
      model_config: a known config name (e.g. ``'vp_cifar10_ddpmpp_deep_continuous'``) or a
        config accepted by :func:`deis_jax.models.get_model`.
      use_ema: take ``params_ema`` (the default, what score_sde samples with); ``False``
        takes ``optimizer.target``.

    Returns:
      The ``params`` tree (nested dict of host numpy arrays) for
      ``model.apply({'params': params}, ...)``.

    Raises:
      FileNotFoundError: the file is missing (the message says what to download).
      ValueError: not a score_sde state, or the tree does not match the model; the message
        names the first mismatching path.
    """
    path = os.fspath(path)
    config = resolve_model_config(model_config)
    checkpoint_dir = config.get("checkpoint_dir") if hasattr(config, "get") else None
    state = load_score_sde_state(path, checkpoint_dir)
    if use_ema:
        if "params_ema" not in state:
            raise ValueError(
                f"'{path}' has no 'params_ema' (top-level keys: {sorted(state)}); "
                "is it a score_sde checkpoint?"
            )
        params, what = state["params_ema"], "score_sde params_ema"
    else:
        target = state.get("optimizer", {})
        if not isinstance(target, dict) or "target" not in target:
            raise ValueError(
                f"'{path}' has no 'optimizer/target' (top-level keys: {sorted(state)}); "
                "is it a score_sde checkpoint?"
            )
        params, what = target["target"], "score_sde optimizer.target"
    check_params_tree(params, abstract_params(config), what)
    return jax.tree.map(np.asarray, params)


# ------------------------------------------------------------------------ converted format
def save_params(
    path: str | os.PathLike,
    params: Any,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``params`` as an Orbax checkpoint directory at ``path`` plus a JSON sidecar.

    ``metadata`` (JSON-serialisable; e.g. the model config) is stored in
    ``<path>/deis_jax_metadata.json`` together with the format version and parameter count.
    An existing ``path`` is an error unless ``overwrite``.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"'{path}' already exists (pass overwrite=True to replace it)")
    host_params = jax.tree.map(np.asarray, params)
    num_params = int(sum(np.size(x) for x in jax.tree.leaves(host_params)))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, host_params, force=overwrite)
        checkpointer.wait_until_finished()
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "num_params": num_params,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **dict(metadata or {}),
    }
    with open(os.path.join(path, METADATA_FILE), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True, default=_json_default)


def _json_default(value: Any):
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        return value.to_dict()
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _missing_converted(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"converted parameters not found at '{path}'. Create them from a score_sde checkpoint "
        "with: python scripts/convert_score_sde_checkpoint.py --checkpoint "
        "checkpoints/<sde>/<model>/checkpoint_<N> --model_config <name> --out " + path
    )


def load_params_metadata(path: str | os.PathLike) -> dict:
    """The JSON sidecar written by :func:`save_params` (``{}`` if there is none)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise _missing_converted(path)
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.exists(meta_path):
        return {}
    with open(meta_path) as f:
        return json.load(f)


def load_params(path: str | os.PathLike, model_config: Any = None) -> dict:
    """Read parameters written by :func:`save_params`.

    With ``model_config`` (a known name or a config), the tree is checked against the model
    and a mismatch raises ``ValueError`` naming the first mismatching path. Returns a nested
    dict of host numpy arrays.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise _missing_converted(path)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path)
    params = jax.tree.map(np.asarray, params)
    if model_config is not None:
        check_params_tree(params, abstract_params(resolve_model_config(model_config)), f"'{path}'")
    return params
