"""How the finished units of a generation run are stored on disk and verified.

This module owns the layout of a sample directory and every check on it; the generation loop
(:mod:`deis_jax.experiments.generation`) decides *what* to compute and calls in here to store
it. Layout of ``out_dir``:

* ``spec.json`` (:data:`SPEC_FILE`) -- what is being generated and its ``fingerprint``,
  written by the generation loop; read here by :func:`finalize`.
* ``shard_000000.npz`` ... (:func:`shard_name`) -- shard ``k`` holds the samples with global
  indices ``[k * shard_size, min((k + 1) * shard_size, num_samples))``
  (:func:`shard_bounds`): arrays ``samples``, ``indices`` (int64), ``fingerprint`` and
  ``identity`` (the JSON of the identity settings). Written atomically (temporary file in the
  same directory, fsync, rename) by :func:`write_shard`, then its **sidecar**
  ``shard_000000.npz.sha256`` (``sha256sum`` format: ``<hex>  shard_000000.npz``), the sha256
  of the bytes just written, also atomically.
* ``manifest.json`` (:data:`MANIFEST_FILE`) -- written last by :func:`finalize`, once every
  shard is verified: the spec plus the list of shards with their counts, sizes and sha256.
  :func:`load_samples` refuses a directory without it and checks every hash and that the
  indices are exactly ``0 .. num_samples - 1``.

Integrity (nothing lost, nothing mixed, nothing damaged blessed):

* **Restart** (:func:`scan_shards`). Every shard on disk is verified before it is trusted
  (:func:`check_shard`): its sha256 must equal its sidecar's and it must hold this run's
  fingerprint and index range. A verified shard is skipped (nothing finished is recomputed); a
  shard without a sidecar (killed between the two writes) or of another index range (an
  earlier, smaller ``num_samples``) is recomputed; a **damaged** one (hash mismatch,
  unreadable) is renamed ``shard_000003.npz.damaged-<time>`` (named in the log) and
  recomputed; a shard of **another run** (other fingerprint) is refused with
  :class:`DifferentRunError`, naming the differing settings. A killed writer leaves at most a
  ``.tmp-*`` file, which :func:`clean_temp_files` removes.
* **Torn manifest.** An unreadable ``manifest.json`` is removed
  (:func:`drop_unusable_manifest`) and rebuilt from the verified shards.
* **The manifest** is written only from shards that pass :func:`check_shard`, with the hash
  of their sidecar: a shard damaged on disk is never re-blessed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from deis_jax.common.files import (
    NPZ_ERRORS,
    atomic_write_bytes,
    atomic_write_text,
    move_aside,
    sha256_bytes,
    sha256_file,
)
from deis_jax.common.identity import describe_differences

FORMAT_VERSION = 2  # 2: per-shard sha256 sidecars and the identity inside every shard
SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"
SIDECAR_SUFFIX = ".sha256"
REPAIR = (
    "rerun the same generation command to repair it (damaged shards are moved aside and "
    "recomputed, the manifest is rebuilt from the verified shards)"
)

log = logging.getLogger(__name__)


class IncompleteSamplesError(RuntimeError):
    """The sample directory is missing shards, has no manifest, or fails verification."""


class DifferentRunError(RuntimeError):
    """The output directory holds (part of) a generation run with other settings."""


# --- names and small helpers --------------------------------------------------------------


def shard_name(k: int) -> str:
    """File name of shard ``k``."""
    return f"shard_{k:06d}.npz"


def shard_bounds(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of every shard: fixed size, the last one possibly shorter."""
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def read_json(path: str) -> tuple[Any, str | None]:
    """``(value, None)``, ``(None, None)`` when the file does not exist, or ``(None, why)``
    when it cannot be read or parsed (a torn write, a flipped bit)."""
    if not os.path.exists(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{type(err).__name__}: {err}"


# --- shards: writing and verifying --------------------------------------------------------


def sidecar_path(path: str) -> str:
    """The sha256 sidecar of the shard at ``path``."""
    return path + SIDECAR_SUFFIX


def write_shard(
    path: str, samples: np.ndarray, start: int, stop: int, fingerprint: str, identity: dict
) -> None:
    """Write the shard of global indices ``start .. stop - 1`` (``samples``, this run's
    ``fingerprint`` and ``identity`` settings), then its sidecar with the sha256 of exactly the
    bytes written.

    The old sidecar goes first: a kill at any point leaves either a shard without a sidecar
    (recomputed) or a complete, matching pair -- never a sidecar describing other bytes."""
    arrays = {
        "samples": samples,
        "indices": np.arange(start, stop, dtype=np.int64),
        "fingerprint": np.array(fingerprint),
        "identity": np.array(json.dumps(identity, sort_keys=True)),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    if os.path.exists(sidecar_path(path)):
        os.unlink(sidecar_path(path))
    atomic_write_bytes(path, data)
    digest = sha256_bytes(data)
    atomic_write_text(sidecar_path(path), f"{digest}  {os.path.basename(path)}\n")


_SIDECAR_LINE = re.compile(r"([0-9a-f]{64})  (\S+)\n")


def _recorded_sha256(path: str) -> str | None:
    """The hash in the sidecar of ``path`` (``None``: no sidecar); ``ValueError`` when the
    sidecar is unreadable or names another file."""
    try:
        with open(sidecar_path(path), encoding="ascii") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"unreadable {SIDECAR_SUFFIX} sidecar ({err})") from None
    match = _SIDECAR_LINE.fullmatch(text)
    if match is None or match.group(2) != os.path.basename(path):
        raise ValueError(f"malformed {SIDECAR_SUFFIX} sidecar {text[:80]!r}")
    return match.group(1)


@dataclasses.dataclass(frozen=True)
class ShardCheck:
    """What :func:`check_shard` found. ``state``: ``'ok'`` (verified: use it), ``'missing'``,
    ``'unrecorded'`` (no sidecar: killed between the two writes, or copied without it),
    ``'stale'`` (another index range: an earlier run with another ``num_samples``),
    ``'damaged'`` (hash mismatch or unreadable), ``'foreign'`` (another run's fingerprint).
    ``detail`` says why; ``sha256`` is the verified hash (``'ok'``); ``identity`` the
    foreign shard's settings."""

    state: str
    detail: str = ""
    sha256: str | None = None
    identity: dict | None = None


def check_shard(path: str, fingerprint: str, start: int, stop: int) -> ShardCheck:
    """Verify one shard: its bytes against its sidecar's sha256, then its fingerprint and
    its indices ``start .. stop - 1``. Reads the whole file once (to hash it)."""
    if not os.path.exists(path):
        return ShardCheck("missing")
    try:
        recorded = _recorded_sha256(path)
    except ValueError as err:
        return ShardCheck("damaged", str(err))
    if recorded is None:
        return ShardCheck("unrecorded", f"no {SIDECAR_SUFFIX} sidecar")
    actual = sha256_file(path)
    if actual != recorded:
        return ShardCheck(
            "damaged", f"sha256 {actual[:12]}… differs from the recorded {recorded[:12]}…"
        )
    try:
        with np.load(path) as f:
            fp, indices = str(f["fingerprint"]), np.asarray(f["indices"])
            identity = json.loads(str(f["identity"])) if fp != fingerprint else None
    except (*NPZ_ERRORS, json.JSONDecodeError) as err:
        return ShardCheck("damaged", f"unreadable ({type(err).__name__}: {err})")
    if fp != fingerprint:
        return ShardCheck("foreign", f"fingerprint {fp}, this run {fingerprint}", None, identity)
    if indices.shape != (stop - start,) or not np.array_equal(indices, np.arange(start, stop)):
        return ShardCheck("stale", f"holds other indices than {start} .. {stop - 1}")
    return ShardCheck("ok", sha256=actual)


def clean_temp_files(out_dir: str) -> None:
    """Remove what a killed writer left: ``io_utils`` temporaries ``.tmp-<random>shard_*``."""
    for name in os.listdir(out_dir):
        if name.startswith(".tmp-") and "shard_" in name:
            try:
                os.unlink(os.path.join(out_dir, name))
            except OSError:
                pass


# --- restart: what is on disk -------------------------------------------------------------


def scan_shards(
    out_dir: str,
    shards: Sequence[int],
    bounds: Sequence[tuple[int, int]],
    fingerprint: str,
    identity: dict,
) -> tuple[list[int], list[int]]:
    """``(pending, skipped)`` among ``shards`` (``bounds[k]``: shard ``k``'s index range) for
    the run of ``fingerprint`` and ``identity`` settings: verified ones are skipped; damaged
    ones are moved aside (logged) and redone; a foreign one raises :class:`DifferentRunError`
    naming the settings that differ."""
    pending, skipped = [], []
    for k in shards:
        path = os.path.join(out_dir, shard_name(k))
        check = check_shard(path, fingerprint, *bounds[k])
        if check.state == "ok":
            skipped.append(k)
            continue
        if check.state == "foreign":
            lines = describe_differences(check.identity, identity)
            raise DifferentRunError(
                f"{path} was written by a different generation run; what differs:\n  "
                + "\n  ".join(lines or [check.detail])
                + f"\nMove or delete it (and {os.path.basename(sidecar_path(path))}) to "
                f"recompute it with this run's settings, or use another output directory."
            )
        pending.append(k)
        if check.state == "damaged":
            moved = [move_aside(path, "damaged")]
            if os.path.exists(sidecar_path(path)):
                moved.append(move_aside(sidecar_path(path), "damaged"))
            log.warning(
                "%s is damaged (%s): moved aside to %s; it is recomputed",
                path, check.detail, ", ".join(moved),
            )  # fmt: skip
        elif check.state in ("unrecorded", "stale"):
            log.info("%s: %s; it is recomputed", path, check.detail)
    return pending, skipped


def drop_unusable_manifest(out_dir: str, num_samples: int) -> None:
    """Remove a torn manifest (warning) or one of an earlier, different ``num_samples``; the
    manifest is rebuilt from the verified shards at the end."""
    path = os.path.join(out_dir, MANIFEST_FILE)
    manifest, why = read_json(path)
    if why is not None:
        log.warning("%s is damaged (%s): removed; it is rebuilt from the verified shards",
                    path, why)  # fmt: skip
        os.unlink(path)
    elif manifest is not None and (
        not isinstance(manifest, dict) or manifest.get("num_samples") != num_samples
    ):
        os.unlink(path)


# --- manifest -----------------------------------------------------------------------------


def finalize(out_dir: str) -> dict | None:
    """Verify every shard of ``spec.json`` (:func:`check_shard`), then write the manifest with
    the verified hashes.

    Returns the manifest, or ``None`` (and writes nothing) when a shard is missing or fails
    its check -- the log says which and why. Never moves or changes a shard. Safe to run
    again: ``python -m deis_jax.experiments.generation finalize DIR``."""
    spec, why = read_json(os.path.join(out_dir, SPEC_FILE))
    if not isinstance(spec, dict) or "fingerprint" not in spec:
        raise IncompleteSamplesError(
            f"{os.path.join(out_dir, SPEC_FILE)} is missing or damaged ({why or 'no run spec'}): "
            f"{REPAIR}"
        )
    n, size, fingerprint = spec["num_samples"], spec["num_samples_per_shard"], spec["fingerprint"]
    shards, problems = [], []
    for k, (start, stop) in enumerate(shard_bounds(n, size)):
        path = os.path.join(out_dir, shard_name(k))
        check = check_shard(path, fingerprint, start, stop)
        if check.state != "ok":
            problems.append(f"{shard_name(k)}: {check.state} {check.detail}".rstrip())
            continue
        shards.append(
            {
                "file": shard_name(k),
                "start": start,
                "stop": stop,
                "count": stop - start,
                "bytes": os.path.getsize(path),
                "sha256": check.sha256,
            }
        )
    if problems:
        log.error(
            "%s: %d of %d shards missing or unverified (%s); no manifest written. Run the "
            "generation again (it resumes and recomputes them), or copy the shard_* files "
            "(shards and their .sha256 sidecars) of every host here and run "
            "`python -m deis_jax.experiments.generation finalize %s`.",
            out_dir, len(problems), len(problems) + len(shards), "; ".join(problems[:3]),
            out_dir,
        )  # fmt: skip
        return None
    manifest = dict(spec)
    manifest.update(
        {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "count": sum(s["count"] for s in shards),
            "num_shards": len(shards),
            "shards": shards,
        }
    )
    atomic_write_text(
        os.path.join(out_dir, MANIFEST_FILE), json.dumps(manifest, indent=1, sort_keys=True)
    )
    return manifest


@dataclasses.dataclass(frozen=True)
class Samples:
    """The samples of a finished generation run and its manifest (:func:`load_samples`)."""

    samples: np.ndarray  # (num_samples, ...) ordered by global index
    manifest: dict


def load_manifest(out_dir: str) -> dict:
    """The manifest of a finished generation run (:class:`IncompleteSamplesError` when it is
    missing or damaged, saying how to repair)."""
    path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        raise IncompleteSamplesError(
            f"{out_dir} has no {MANIFEST_FILE}: the generation did not finish (run it again, it "
            f"resumes) or was not finalized "
            f"(`python -m deis_jax.experiments.generation finalize {out_dir}`)"
        )
    manifest, why = read_json(path)
    keys = ("num_samples", "count", "fingerprint", "shards")
    if why is None and not (isinstance(manifest, dict) and all(k in manifest for k in keys)):
        why = f"not a manifest: it lacks one of {keys}"
    if why is not None:
        raise IncompleteSamplesError(f"{path} is damaged ({why}): {REPAIR}")
    return manifest


def load_samples(out_dir: str, *, verify: bool = True) -> Samples:
    """All samples of a finished generation, in global index order, after verification.

    Checks (``verify=True``): the manifest exists and is readable, every listed shard exists
    with its sha256 and the manifest's fingerprint, the shards' indices are exactly
    ``0 .. num_samples - 1``. Any failure raises :class:`IncompleteSamplesError` naming the
    file and how to repair it."""
    manifest = load_manifest(out_dir)
    n = manifest["num_samples"]
    try:
        counted = sum(s["count"] for s in manifest["shards"])
        entries = sorted(manifest["shards"], key=lambda s: s["start"])
    except (KeyError, TypeError) as err:
        raise IncompleteSamplesError(
            f"{os.path.join(out_dir, MANIFEST_FILE)} is damaged (bad shard list: {err!r}): {REPAIR}"
        ) from None
    if manifest["count"] != n or counted != n:
        raise IncompleteSamplesError(f"{out_dir}: manifest counts do not add up to {n}: {REPAIR}")
    parts, covered = [], 0
    for entry in entries:
        path = os.path.join(out_dir, entry["file"])
        if not os.path.exists(path):
            raise IncompleteSamplesError(f"{path} is missing: {REPAIR}")
        if verify and sha256_file(path) != entry["sha256"]:
            raise IncompleteSamplesError(
                f"{path} fails its sha256 (damaged after it was written): {REPAIR}"
            )
        try:
            with np.load(path) as f:
                samples, indices = f["samples"], f["indices"]
                fp = str(f["fingerprint"])
        except NPZ_ERRORS as err:
            raise IncompleteSamplesError(
                f"{path} is unreadable ({type(err).__name__}: {err}): {REPAIR}"
            ) from None
        if fp != manifest["fingerprint"]:
            raise IncompleteSamplesError(
                f"{path} belongs to another run (fingerprint {fp}, manifest "
                f"{manifest['fingerprint']}): {REPAIR}"
            )
        if entry["start"] != covered or not np.array_equal(
            indices, np.arange(entry["start"], entry["stop"])
        ):
            raise IncompleteSamplesError(
                f"{path} covers the wrong indices (expected from {covered}): {REPAIR}"
            )
        covered = entry["stop"]
        parts.append(samples)
    if covered != n:
        raise IncompleteSamplesError(f"{out_dir}: shards cover {covered} of {n} samples: {REPAIR}")
    return Samples(np.concatenate(parts), manifest)
