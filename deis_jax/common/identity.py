"""What a result was made for: the one digest of settings and records, the array digests, one
description of a settings object, and one diff of two sets of settings.

Every file format and cache of deis_jax identifies its content with these and nothing else:

* :func:`json_digest` -- sha256 of the canonical JSON text (:func:`canonical_json`: keys
  sorted) of settings or a record: the seal of a fitted file (:func:`record_sha256`) and of a
  cached cell (``deis_jax.experiments.engine``), the identity of a resumable fit.
* :func:`fingerprint` -- the short (16 hex) id of a settings payload: a cell cache, a sample
  run, a model id. It is sha1 of the same canonical text, as every cache, sample run and
  fitted file written so far records it.
* :func:`array_digest` (an array's shape and float64 values: teacher caches, learned
  parameters, :func:`describe_object`), :func:`float64_digest` (values only: a sampler's grid
  and table) and :func:`arrays_digest` (named arrays with dtype, shape and bytes: network
  weights, converted Inception weights; :func:`tree_digest` of a parameter tree) -- the
  arrays' part of an identity.
* :func:`differences` -- the one diff of two settings dicts, rendered as "what a file was
  fitted for" (:func:`settings_differences`) or as "a stored run against this one"
  (:func:`describe_differences`).

Imports nothing of deis_jax, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

SHA256_KEY = "sha256"  # the entry of a sealed JSON record that holds its checksum

# --- digests ----------------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """The JSON text every digest hashes: keys sorted, other objects by ``str``."""
    return json.dumps(value, sort_keys=True, default=str)


def json_digest(value: Any) -> str:
    """sha256 (hex) of :func:`canonical_json` of ``value``: the digest of settings and
    records (the same for a record and its JSON round trip when its keys are strings)."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def fingerprint(value: Any) -> str:
    """The short stable id (16 hex) of a JSON-able settings payload: a cell cache, a sample
    run, a model. sha1 of :func:`canonical_json`, as the caches and fitted files on disk
    record it; :func:`describe_differences` says which settings make two payloads differ."""
    return hashlib.sha1(canonical_json(value).encode()).hexdigest()[:16]


def record_sha256(record: Mapping[str, Any]) -> str:
    """The seal of a JSON record: :func:`json_digest` of the record without its
    ``"sha256"`` entry, as it reads back from JSON (tuples become lists, keys strings; NaN is
    refused), so a record and its file's contents give the same digest."""
    body = {k: v for k, v in record.items() if k != SHA256_KEY}
    return json_digest(json.loads(json.dumps(body, allow_nan=False)))


def array_digest(x: Any) -> str:
    """sha256 (hex) of an array's shape and float64 values (so float32 and float64 copies of
    the same values hash alike)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
    digest = hashlib.sha256(repr(x.shape).encode())
    digest.update(x.tobytes())
    return digest.hexdigest()


def float64_digest(arrays: Iterable[Any]) -> str:
    """sha256 (hex) of the float64 values of ``arrays``, one after the other (no shapes: for
    arrays whose shapes the rest of an identity fixes, e.g. a sampler's grid and table)."""
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(np.asarray(a, np.float64)).tobytes())
    return digest.hexdigest()


def arrays_digest(named: Iterable[tuple[str, Any]], *, sep: str = "|") -> str:
    """sha256 (hex) of named arrays in the given order: for each, ``name``, dtype and shape
    (each followed by ``sep``) and the raw bytes -- the weights themselves, dtype included.
    The separator is part of the formats that record the digest (network parameters: ``|``;
    converted Inception weights: ``\\0``)."""
    digest = hashlib.sha256()
    for name, value in named:
        a = np.ascontiguousarray(value)
        digest.update(f"{name}{sep}{a.dtype.str}{sep}{a.shape}{sep}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def tree_digest(tree: Any) -> str:
    """:func:`arrays_digest` of a pytree's leaves named by their paths (``|``): a network's
    parameters themselves -- a result cache identifies the weights, not just a checkpoint
    step that a retraining would reuse."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return arrays_digest((jax.tree_util.keystr(p), jax.device_get(leaf)) for p, leaf in leaves)


def describe_object(obj: Any) -> dict[str, Any]:
    """A JSON-able description of a small value object (e.g. a noise schedule): its class and
    dataclass fields, arrays replaced by ``"sha256:" + array_digest`` (a ``repr`` would hide
    e.g. a discrete schedule's ``alphas_cumprod``); a non-dataclass is described by its
    ``repr``."""
    out: dict[str, Any] = {"class": type(obj).__name__}
    if dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if hasattr(value, "shape") and hasattr(value, "dtype") and np.ndim(value) > 0:
                value = "sha256:" + array_digest(value)
            elif isinstance(value, np.generic):
                value = value.item()
            out[field.name] = value
    else:
        out["repr"] = repr(obj)
    return json.loads(json.dumps(out, default=repr))


# --- the diff ---------------------------------------------------------------------------------

ABSENT = object()  # a setting one side does not have


def _same(a: Any, b: Any, rel_tol: float | None) -> bool:
    """Equal, with numbers (also inside lists and dicts) equal to ``rel_tol``: a grid
    recomputed on another machine may differ in its last bits. Tuples equal lists. ``rel_tol``
    None: the same JSON text (:func:`canonical_json`; ``1`` and ``1.0`` differ)."""
    if rel_tol is None:
        return canonical_json(a) == canonical_json(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, float | int) and isinstance(b, float | int):
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y, rel_tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rel_tol) for k in a)
    return a == b


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of nested dicts (lists and other values are leaves)."""
    if not isinstance(value, Mapping) or not value:
        return {prefix or "(root)": value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(
    have: Mapping[str, Any],
    want: Mapping[str, Any],
    *,
    rel_tol: float | None = None,
    only_wanted: bool = False,
    nested: bool = False,
) -> list[tuple[str, Any, Any]]:
    """``(key, have value, want value)`` for every setting that differs (:data:`ABSENT` for a
    side without it), keys in ``want``'s order then ``have``'s. Numbers compare to
    ``rel_tol`` (None: the same JSON text), tuples equal lists. ``only_wanted``: the settings
    of ``want`` only (a file may record more than is asked of it); ``nested``: nested dicts
    compared leaf by leaf, keys their dotted paths."""
    if nested:
        have, want = _flatten(have), _flatten(want)
    keys = list(want) if only_wanted else list(dict.fromkeys([*want, *have]))
    out = []
    for key in keys:
        a, b = have.get(key, ABSENT), want.get(key, ABSENT)
        if a is ABSENT or b is ABSENT or not _same(a, b, rel_tol):
            if not (a is ABSENT and b is ABSENT):
                out.append((key, a, b))
    return out


def settings_differences(
    have: Mapping[str, Any],
    want: Mapping[str, Any],
    *,
    verb: str = "made",
    rel_tol: float = 1e-9,
) -> list[str]:
    """One line per setting of ``want`` that ``have`` (what a file was made for) lacks or
    holds otherwise: ``"<key>: <verb> for <have>, asked for <want>"`` (e.g. verb
    ``fitted``/``trained``). Numbers compare to ``rel_tol`` (default 1e-9: a float64 grid is
    the same grid if it is recomputed with a few ulp of difference)."""
    out = []
    for key, a, b in differences(have, want, rel_tol=rel_tol, only_wanted=True):
        if a is ABSENT:
            out.append(f"{key}: not recorded, asked for {b!r}")
        else:
            out.append(f"{key}: {verb} for {a!r}, asked for {b!r}")
    return out


_HEX_DIGEST = re.compile(r"[0-9a-f]{32,}")


def _show(value: Any) -> str:
    """A short display of one setting: hex digests cut to 12 characters, long values to 60."""
    if value is ABSENT:
        return "(absent)"
    if isinstance(value, str) and _HEX_DIGEST.fullmatch(value):
        return value[:12] + "…"
    text = canonical_json(value)
    return text if len(text) <= 60 else text[:59] + "…"


def describe_differences(
    stored: Any, current: Any, labels: tuple[str, str] = ("on disk", "this run")
) -> list[str]:
    """One line per setting that differs between a stored identity payload (what
    :func:`fingerprint` hashes) and the current one, named by its dotted path, sorted:
    ``"metadata.model.params_sha256: 3fa2c0d1e2f3… (on disk) vs 91bc04a5b6c7… (this run)"``
    (``labels`` name the two sides). Empty when the payloads are equal."""
    found = sorted(differences(stored, current, nested=True), key=lambda d: d[0])
    return [f"{key}: {_show(a)} ({labels[0]}) vs {_show(b)} ({labels[1]})" for key, a, b in found]
