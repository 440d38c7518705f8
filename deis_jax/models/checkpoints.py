"""Model parameters on disk in the project's own format, and the check of a parameter tree.

:func:`save_params` / :func:`load_params` store a parameter tree as an Orbax checkpoint
directory written with ``orbax.checkpoint.StandardCheckpointer`` (the same library the training
loop uses for its checkpoints), plus a small JSON sidecar ``deis_jax_metadata.json`` inside that
directory (model config, parameter count; for an imported published checkpoint also its path and
sha256, which parameter set, its training step and EMA rate, and the layout conversions
applied). Orbax was chosen over a plain msgpack file because it is the project's checkpoint
library, reads arrays lazily per leaf instead of one big blob and can later restore directly
into a sharded layout. Leaves are saved as host numpy arrays so that a checkpoint restores on
any device topology. Restoring does not pass a target tree to Orbax (it does not reject shape
mismatches); instead the restored tree is checked with :func:`check_params_tree`, which gives a
precise error.

Importing the published weights of a family is the family's business:
``deis_jax.models.score_sde.published`` reads score_sde's msgpack files,
``deis_jax.models.edm.convert`` EDM's pickles; both write this format.
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

from deis_jax.common.checkpoint_store import CheckpointError

METADATA_FILE = "deis_jax_metadata.json"
FORMAT_NAME = "deis_jax.params"
FORMAT_VERSION = 1
OLD_NORM_LAYOUT = "old_groupnorm_layout"

__all__ = [
    "CheckpointNotFoundError",
    "check_converted_params",
    "check_params_tree",
    "flatten_tree",
    "load_params",
    "leaf_shape",
    "load_params_metadata",
    "old_norm_channels",
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


def leaf_shape(leaf: Any) -> tuple[int, ...] | None:
    """The shape of an array leaf as a tuple of ints (None for a leaf that is not an array)."""
    shape = getattr(leaf, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _describe(leaf: Any) -> str:
    """The shape of an array leaf, or what the leaf is instead."""
    shape = leaf_shape(leaf)
    return str(shape) if shape is not None else f"a {type(leaf).__name__}, not an array"


def old_norm_channels(shape: tuple[int, ...] | None) -> int | None:
    """``C`` if ``shape`` is flax 0.3's GroupNorm parameter layout ``(1, 1, 1, C)``, else None."""
    if shape is not None and len(shape) == 4 and shape[:3] == (1, 1, 1):
        return shape[3]
    return None


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
        expect = leaf_shape(want[path])
        return _CONFIG, f"missing parameter '{path}' (the model expects shape {expect})"
    if path not in want:
        name = path.rsplit("/", 1)[-1]
        cause = _CONFIG if name in names else _LAYOUT
        reason = "" if name in names else f"; '{name}' is not a parameter name the model uses"
        return (
            cause,
            f"unexpected parameter '{path}' (shape {leaf_shape(got[path])}) not in the "
            f"model{reason}",
        )
    have, expect = leaf_shape(got[path]), leaf_shape(want[path])
    if have == expect:
        return None
    text = (
        f"shape mismatch at '{path}': {what} has {_describe(got[path])}, the model expects {expect}"
    )
    channels = old_norm_channels(have)
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
      (``score_sde.published.convert_old_layout`` converts it; score_sde files are converted on
      import);
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


def load_params(path: str | os.PathLike, expected: Any = None) -> dict:
    """Read parameters written by :func:`save_params`.

    With ``expected`` (the model's parameter tree, abstract or not: e.g.
    ``deis_jax.models.score_sde.abstract_params(config)``), the tree is checked against it and a
    mismatch raises ``ValueError`` naming the first mismatching path
    (:func:`check_params_tree`). Returns a nested dict of host numpy arrays.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise _missing_converted(path)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path)
    params = jax.tree.map(np.asarray, params)
    if expected is not None:
        check_params_tree(params, expected, f"'{path}'")
    return params


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
