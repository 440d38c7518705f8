"""Model parameters on disk: import of score_sde checkpoints and the project's own format.

**score_sde checkpoints.** The published checkpoints (Song et al., 2021) are single msgpack
files ``checkpoint_<N>`` written by flax 0.3.1's ``save_checkpoint`` (``to_state_dict`` of
score_sde's training state, then ``msgpack_serialize``). Their top level is
``{step, optimizer: {target, state: {step, param_states}}, lr, model_state, ema_rate,
params_ema, rng}`` (``lr`` and ``ema_rate`` plain floats); sampling uses ``params_ema``
(``optimizer.target`` are the raw, non-averaged weights). :func:`load_score_sde_params` reads
one with ``flax.serialization.msgpack_restore`` (no ``flax.optim`` needed) and picks the
parameters. flax 0.3 stored GroupNorm's ``scale`` and ``bias`` as ``(1, 1, 1, C)``, today's
flax as ``(C,)``; those leaves are reshaped (:func:`convert_old_layout`, an exact, counted
conversion). The tree is then checked against the one the model expects (``jax.eval_shape``
of its init, so nothing is computed); a mismatch is a ``ValueError`` that names the leaf,
both shapes and the likely cause: a different model config or an unknown file layout.

Download the checkpoints from the "Pretrained checkpoints" section of
https://github.com/yang-song/score_sde (Google Drive) and put them under ``checkpoints/``,
e.g. ``checkpoints/vp/cifar10_ddpmpp_deep_continuous/checkpoint_8``. Nothing is downloaded at
run time.

**Converted format.** :func:`save_params` / :func:`load_params` store a parameter tree as an
Orbax checkpoint directory written with ``orbax.checkpoint.StandardCheckpointer`` (the same
library the training loop uses for its checkpoints), plus a small JSON sidecar
``deis_jax_metadata.json`` inside that directory (model config, parameter count; for an
imported score_sde file also its path and sha256, which parameter set, its training step and
EMA rate, and the layout conversions applied). Orbax was chosen over a plain msgpack file
because it is the project's checkpoint library, reads arrays lazily per leaf instead of one
big blob and can later restore directly into a sharded layout. Leaves are saved as host
numpy arrays so that a checkpoint restores on any device topology. Restoring does not pass a
target tree to Orbax (it does not reject shape mismatches); instead the restored tree is
checked with :func:`check_params_tree`, which gives a precise error.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import msgpack
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from deis_jax.common.checkpoint_store import CheckpointError
from deis_jax.models.score_sde import abstract_params
from deis_jax.models.score_sde.configs import get_model_config

SCORE_SDE_URL = "https://github.com/yang-song/score_sde"
METADATA_FILE = "deis_jax_metadata.json"
FORMAT_NAME = "deis_jax.params"
FORMAT_VERSION = 1
SCORE_SDE_LAYOUT = ("step", "optimizer", "lr", "model_state", "ema_rate", "params_ema", "rng")
OLD_NORM_LAYOUT = "old_groupnorm_layout"

__all__ = [
    "CheckpointNotFoundError",
    "check_converted_params",
    "check_params_tree",
    "check_score_sde_params",
    "convert_old_layout",
    "flatten_tree",
    "import_score_sde_params",
    "load_params",
    "load_params_metadata",
    "load_score_sde_params",
    "load_score_sde_state",
    "resolve_model_config",
    "save_params",
]


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """There is no checkpoint where the config points (``config.sampling.checkpoint`` or
    ``<workdir>/checkpoints``)."""


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


def _describe(leaf: Any) -> str:
    """The shape of an array leaf, or what the leaf is instead."""
    shape = _shape(leaf)
    return str(shape) if shape is not None else f"a {type(leaf).__name__}, not an array"


def _old_norm_channels(shape: tuple[int, ...] | None) -> int | None:
    """``C`` if ``shape`` is flax 0.3's GroupNorm parameter layout ``(1, 1, 1, C)``, else None."""
    if shape is not None and len(shape) == 4 and shape[:3] == (1, 1, 1):
        return shape[3]
    return None


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
        target = _shape(want.get(path))
        if target is None or len(target) != 1 or _old_norm_channels(_shape(tree)) != target[0]:
            return tree
        count += 1
        return np.reshape(np.asarray(tree), target)

    converted = convert(params, "")
    return converted, ({OLD_NORM_LAYOUT: count} if count else {})


# Why a mismatch happens: a different model config (channel counts, numbers of blocks, another
# network), flax 0.3's norm layout that was not converted, or a file layout deis_jax does not know.
_CONFIG, _OLD_LAYOUT, _LAYOUT = "config", "old_layout", "layout"


def _mismatch(path: str, got: dict, want: dict, names: set[str], what: str):
    """``(cause, description)`` of the mismatch at ``path`` (None when it matches).

    A model config changes channel counts (same rank), which blocks exist (missing or extra
    paths with the model's parameter names) and the channels of a norm; it never changes a
    parameter's rank or name, so those point at the file layout.
    """
    if path not in got:
        return _CONFIG, f"missing parameter '{path}' (the model expects shape {_shape(want[path])})"
    if path not in want:
        name = path.rsplit("/", 1)[-1]
        cause = _CONFIG if name in names else _LAYOUT
        reason = "" if name in names else f"; '{name}' is not a parameter name the model uses"
        return (
            cause,
            f"unexpected parameter '{path}' (shape {_shape(got[path])}) not in the model{reason}",
        )
    have, expect = _shape(got[path]), _shape(want[path])
    if have == expect:
        return None
    text = (
        f"shape mismatch at '{path}': {what} has {_describe(got[path])}, the model expects {expect}"
    )
    channels = _old_norm_channels(have)
    if len(expect) == 1 and channels is not None:
        if channels == expect[0]:
            return _OLD_LAYOUT, text
        return _CONFIG, f"{text} (flax 0.3's GroupNorm layout, with {channels} channels)"
    return (_CONFIG if have is not None and len(have) == len(expect) else _LAYOUT), text


_HINTS = {
    _LAYOUT: (
        "This looks like an unknown file layout, not a different model config (a config changes "
        "channel counts and numbers of blocks, not a parameter's rank or name, nor every "
        "path). deis_jax "
        "reads score_sde checkpoints as published (flax 0.3.1, whose (1, 1, 1, C) GroupNorm "
        "parameters it converts) and its own converted format; bring other layouts to the "
        "model's parameter tree first."
    ),
    _OLD_LAYOUT: (
        "These are flax 0.3's GroupNorm parameters, stored as (1, 1, 1, C) where today's flax "
        "uses (C,): read a score_sde checkpoint with load_score_sde_params or "
        "scripts/convert_score_sde_checkpoint.py, which convert them."
    ),
    _CONFIG: (
        "This looks like a different model config (a different nf, ch_mult, num_res_blocks, "
        "attn_resolutions or network gives such mismatches): is the model config the one the "
        "checkpoint was trained with?"
    ),
}


def check_params_tree(params: Any, expected: Any, what: str = "checkpoint") -> None:
    """Raise ``ValueError`` unless ``params`` has exactly the paths and shapes of ``expected``.

    The message counts all mismatches (missing, unexpected, wrong shape) and names the cause:

    * an unknown file layout -- a parameter of another rank than the model's, a name the model
      does not use, or no path in common at all (no model config does that);
    * flax 0.3's GroupNorm layout ``(1, 1, 1, C)`` where the model has ``(C,)``
      (:func:`convert_old_layout` converts it; score_sde files are converted on import);
    * else a different model config (channel counts, blocks, network).

    It names the first mismatching path (sorted order) of the cause it reports, with both
    shapes for a shape mismatch.
    """
    got, want = flatten_tree(params), flatten_tree(expected)
    names = {path.rsplit("/", 1)[-1] for path in want}
    found = {
        path: found
        for path in sorted(set(got) | set(want))
        if (found := _mismatch(path, got, want, names, what)) is not None
    }
    if not found:
        return
    missing = sum(path not in got for path in found)
    unexpected = sum(path not in want for path in found)
    counts = (
        f"{missing} missing, {unexpected} unexpected, "
        f"{len(found) - missing - unexpected} with the wrong shape, "
        f"of the model's {len(want)} parameter arrays"
    )
    if got and not set(got) & set(want):
        cause = _LAYOUT
        first = (
            f"no parameter path is one the model has (the first in the {what}: "
            f"'{min(got)}', in the model: '{min(want)}')"
        )
    else:
        causes = {cause for cause, _ in found.values()}
        cause = next(c for c in (_LAYOUT, _OLD_LAYOUT, _CONFIG) if c in causes)
        first = next(text for c, text in found.values() if c == cause)
    raise ValueError(
        f"{what} parameters do not match the model: {first} ({counts}). {_HINTS[cause]}"
    )


def resolve_model_config(model_config: Any):
    """A known config name (``deis_jax.models.score_sde.KNOWN_MODEL_CONFIGS``) or a config."""
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


def check_score_sde_params(path: str | os.PathLike, model_config: Any, use_ema: bool = True):
    """Every check of :func:`load_score_sde_params` (a readable score_sde state whose
    parameters fit ``model_config``), reading only the arrays' shapes: ``ValueError`` /
    ``FileNotFoundError`` as it raises them."""
    import_score_sde_params(path, model_config, use_ema, shapes_only=True)


def check_converted_params(path: str | os.PathLike, expected: Any) -> None:
    """The converted checkpoint ``path`` (:func:`save_params`) holds the tree ``expected``
    (e.g. :func:`deis_jax.models.score_sde.abstract_params`), judged from Orbax's metadata only (no
    array is read): an unreadable checkpoint raises Orbax's error, a mismatch the
    ``ValueError`` of :func:`check_params_tree`."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise _missing_converted(path)
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
    check_params_tree(tree, expected, f"'{path}'")
