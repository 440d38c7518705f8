"""What a result was made for: one array digest, one description of a settings object, one
settings diff.

Every file that records what it was fitted or trained for (grid files, AMED predictors, learned
rule parameters, teacher caches) describes its settings as a JSON-able dict built from these,
and refuses another use by naming each differing setting (:func:`settings_differences`).
Imports nothing of deis_jax, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def array_digest(x) -> str:
    """sha256 (hex) of an array's shape and float64 values (so float32 and float64 copies of
    the same values hash alike)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
    digest = hashlib.sha256(repr(x.shape).encode())
    digest.update(x.tobytes())
    return digest.hexdigest()


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


def _same(a: Any, b: Any, rel_tol: float) -> bool:
    """Equal, with floats (also inside lists) equal to ``rel_tol``: a grid recomputed on
    another machine may differ in its last bits."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, float | int) and isinstance(b, float | int):
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y, rel_tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rel_tol) for k in a)
    return a == b


def settings_differences(
    have: Mapping[str, Any],
    want: Mapping[str, Any],
    *,
    verb: str = "made",
    rel_tol: float = 1e-9,
) -> list[str]:
    """One line per setting of ``want`` that ``have`` lacks or holds otherwise:
    ``"<key>: <verb> for <have>, asked for <want>"`` (e.g. verb ``fitted``/``trained``).

    Numbers compare to ``rel_tol`` (default 1e-9: a float64 grid is the same grid if it is
    recomputed with a few ulp of difference), everything else exactly."""
    out = []
    for key, value in want.items():
        if key not in have:
            out.append(f"{key}: not recorded, asked for {value!r}")
        elif not _same(have[key], value, rel_tol):
            out.append(f"{key}: {verb} for {have[key]!r}, asked for {value!r}")
    return out
