"""Resumable, sharded, multi-device / multi-host sample generation with a verified manifest.

    from deis_jax.experiments import generation
    result = generation.generate_samples(
        "runs/cifar10/samples/tab3_nfe10", sampler, num_samples=50_000, sample_shape=(32, 32, 3),
        seed=0, shard_size=1000, per_device_batch=128, params=params, bind=lambda p: eps_fn_of(p),
        postprocess=to_uint8, metadata={"config": config.to_dict(), "params_sha256": digest},
    )
    samples = generation.load_samples("runs/cifar10/samples/tab3_nfe10").samples  # (50000, ...)

Layout of ``out_dir``:

* ``spec.json`` -- what is being generated (seed, sampler, shapes, shard size, user
  metadata, git revision) and its ``fingerprint``, the hash of the settings that change a
  sample (:data:`IDENTITY_KEYS`; ``metadata`` is where a caller puts the parameters' hash, the
  checkpoint step...). A restart whose fingerprint differs is refused before any work, with
  one line per differing setting (:func:`deis_jax.experiments.engine.describe_differences`).
* ``shard_000000.npz`` ... -- shard ``k`` holds the samples with global indices
  ``[k * shard_size, min((k + 1) * shard_size, num_samples))``: arrays ``samples``,
  ``indices`` (int64), ``fingerprint`` and ``identity`` (the JSON of the identity settings).
  Written atomically (temporary file in the same directory, fsync, rename), then its
  **sidecar** ``shard_000000.npz.sha256`` (``sha256sum`` format: ``<hex>  shard_000000.npz``),
  the sha256 of the bytes just written, also atomically.
* ``manifest.json`` -- written last, once every shard is verified: the spec plus the list of
  shards with their counts, sizes and sha256. :func:`load_samples` refuses a directory without
  it and checks every hash and that the indices are exactly ``0 .. num_samples - 1``.

Randomness: ``x_T`` of sample ``i`` comes from ``fold_in(prior_key, i)`` and a stochastic
sampler's noise from ``fold_in(fold_in(noise_key, i), step)`` with ``(prior_key, noise_key) =
split(PRNGKey(seed))`` (as ``--mode=sample``): the randomness depends on neither the device
count, the process count nor on where a restart happened, and with the same
``per_device_batch`` the samples are bit-identical across partitioned runs (``docs/scale.md``,
"Determinism").

Integrity (nothing lost, nothing mixed, nothing damaged blessed):

* **Restart.** Every shard on disk is verified before it is trusted (:func:`check_shard`): its
  sha256 must equal its sidecar's and it must hold this run's fingerprint and index range. A
  verified shard is skipped (nothing finished is recomputed); a shard without a sidecar (killed
  between the two writes) or of another index range (an earlier, smaller ``num_samples``) is
  recomputed; a **damaged** one (hash mismatch, unreadable) is renamed
  ``shard_000003.npz.damaged-<time>`` (named in the log) and recomputed; a shard of **another
  run** (other fingerprint) is refused, naming the differing settings. A killed writer leaves
  at most a ``.tmp-*`` file, which is ignored and cleaned up.
* **Torn metadata.** An unreadable ``spec.json`` (it carries no results) is rewritten from
  this run with a warning -- the shards' own fingerprints still guard against mixing; an
  unreadable ``manifest.json`` is removed and rebuilt from the verified shards.
* **Non-finite samples** are never written: a shard with a NaN / Inf sample raises
  :class:`NonFiniteShardError` (a ``diagnostics.NonFiniteSamplesError``) naming their global
  indices, and nothing is written for it.
* **The manifest** is written only from shards that pass :func:`check_shard`, with the hash
  of their sidecar: a shard damaged on disk is never re-blessed.

Several processes (``jax.distributed``): the shards are split into contiguous blocks, one per
process (:func:`deis_jax.parallel.process_range`); every process checks and writes its own
shards (to a shared file system: NFS, Filestore, gcsfuse...). All processes run the same number
of jitted calls over the global mesh (a process with less left to do pads with dummy rows) --
the pending counts are exchanged once with an all-gather. At the end a barrier, then **process
0 writes the manifest** after re-reading and hashing every shard. If the processes do not share
a file system, copy every process's ``shard_*`` files (shards and their sidecars) into one
directory and run ``python -m deis_jax.experiments.generation finalize DIR`` (the same
check-and-write step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from deis_jax import parallel
from deis_jax.experiments import engine
from deis_jax.io_utils import (
    NPZ_ERRORS,
    atomic_write_bytes,
    atomic_write_text,
    move_aside,
    sha256_file,
)
from deis_jax.sampling.diagnostics import NonFiniteSamplesError, nonfinite_samples
from deis_jax.sampling.sampler import Sampler

FORMAT_VERSION = 2  # 2: per-shard sha256 sidecars and the identity inside every shard
SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"
SIDECAR_SUFFIX = ".sha256"
IDENTITY_KEYS = ("num_samples_per_shard", "seed", "sample_shape", "dtype", "sampler", "metadata")
REPAIR = (
    "rerun the same generation command to repair it (damaged shards are moved aside and "
    "recomputed, the manifest is rebuilt from the verified shards)"
)

log = logging.getLogger(__name__)


class IncompleteSamplesError(RuntimeError):
    """The sample directory is missing shards, has no manifest, or fails verification."""


class DifferentRunError(RuntimeError):
    """The output directory holds (part of) a generation run with other settings."""


class NonFiniteShardError(NonFiniteSamplesError):
    """A shard's samples are not all finite; nothing is written for it. ``indices`` are the
    global indices of the bad samples, ``path`` the shard that was not written."""

    def __init__(self, indices: Sequence[int], path: str, start: int, count: int):
        super().__init__(indices)
        self.path = path
        self.args = (
            f"{path} not written (its {count} samples from global index {start}): {self.args[0]}",
        )


# --- small helpers ------------------------------------------------------------------------


def shard_name(k: int) -> str:
    """File name of shard ``k``."""
    return f"shard_{k:06d}.npz"


def shard_bounds(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of every shard: fixed size, the last one possibly shorter."""
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def git_revision(start: str | None = None) -> str | None:
    """Commit of the checkout containing ``start`` (default: this package), read from ``.git``
    without running git; ``None`` outside a checkout."""
    d = os.path.abspath(start or os.path.dirname(os.path.dirname(__file__)))
    while True:
        dot_git = os.path.join(d, ".git")
        if os.path.exists(dot_git):
            break
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent
    try:
        if os.path.isfile(dot_git):  # worktree / submodule: "gitdir: <path>"
            with open(dot_git) as f:
                gitdir = f.read().split(":", 1)[1].strip()
            dot_git = os.path.normpath(os.path.join(d, gitdir))
        common = dot_git
        if os.path.isfile(os.path.join(dot_git, "commondir")):
            with open(os.path.join(dot_git, "commondir")) as f:
                common = os.path.normpath(os.path.join(dot_git, f.read().strip()))
        with open(os.path.join(dot_git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for base in (dot_git, common):
            path = os.path.join(base, ref)
            if os.path.isfile(path):
                with open(path) as f:
                    return f.read().strip()
        packed = os.path.join(common, "packed-refs")
        if os.path.isfile(packed):
            with open(packed) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2 and parts[1] == ref:
                        return parts[0]
    except OSError:
        return None
    return None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def sampler_info(sampler: Sampler) -> dict:
    """JSON description of a sampler, with a hash of its float64 time grid, coefficients and
    learned rule parameters (an AMED predictor's weights)."""
    h = hashlib.sha256(np.ascontiguousarray(sampler.ts, np.float64).tobytes())
    for leaf in jax.tree.leaves((sampler.table, sampler.rule_params)):
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float64)).tobytes())
    return {
        "method": sampler.method,
        "order": int(sampler.order),
        "nfe": int(sampler.nfe),
        "num_steps": int(sampler.num_steps),
        "stochastic": bool(sampler.stochastic),
        "options": _jsonable(sampler.options),
        "final_denoise": sampler.final_table is not None,
        "schedule": type(sampler.schedule).__name__,
        "t_first": float(sampler.ts[0]),
        "t_last": float(sampler.ts[-1]),
        "table_sha256": h.hexdigest(),
    }


def identity_of(spec: dict) -> dict:
    """The settings of ``spec`` that change a sample (:data:`IDENTITY_KEYS`)."""
    return {k: spec.get(k) for k in IDENTITY_KEYS}


def _read_json(path: str) -> tuple[Any, str | None]:
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


def _write_shard(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write a shard, then its sidecar with the sha256 of exactly the bytes written.

    The old sidecar goes first: a kill at any point leaves either a shard without a sidecar
    (recomputed) or a complete, matching pair -- never a sidecar describing other bytes."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    if os.path.exists(sidecar_path(path)):
        os.unlink(sidecar_path(path))
    atomic_write_bytes(path, data)
    digest = hashlib.sha256(data).hexdigest()
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


def _clean_temp_files(out_dir: str) -> None:
    """Remove what a killed writer left: ``io_utils`` temporaries ``.tmp-<random>shard_*``."""
    for name in os.listdir(out_dir):
        if name.startswith(".tmp-") and "shard_" in name:
            try:
                os.unlink(os.path.join(out_dir, name))
            except OSError:
                pass


def _refuse_nonfinite(samples: np.ndarray, start: int, path: str) -> None:
    """Raise :class:`NonFiniteShardError` (global indices) if a sample of a shard is not
    finite."""
    bad = nonfinite_samples(samples)
    if bad.size:
        raise NonFiniteShardError(start + bad, path, start, len(samples))


# --- restart: what is on disk -------------------------------------------------------------


def _check_spec(out_dir: str, spec: dict) -> None:
    """Refuse a directory whose ``spec.json`` describes another run, naming every differing
    setting; warn about a torn ``spec.json`` (rewritten later) and a changed per-device batch
    (same samples up to float rounding)."""
    path = os.path.join(out_dir, SPEC_FILE)
    old, why = _read_json(path)
    if old is not None and not (
        isinstance(old, dict) and engine.fingerprint(identity_of(old)) == old.get("fingerprint")
    ):
        old, why = None, "its fingerprint does not match its settings"
    if why is not None:
        log.warning(
            "%s is damaged (%s); it carries no results and is rewritten from this run (the "
            "shards' own fingerprints are still checked)", path, why,
        )  # fmt: skip
        return
    if old is None:
        return
    if old["fingerprint"] != spec["fingerprint"]:
        lines = engine.describe_differences(identity_of(old), identity_of(spec))
        raise DifferentRunError(
            f"{out_dir} holds samples of a different generation run; what differs:\n  "
            + "\n  ".join(lines)
            + f"\nTo finish the run on disk, rerun it with its settings; to start a new run "
            f"with these settings, use another output directory (--workdir) or delete "
            f"{out_dir}."
        )
    if old.get("per_device_batch") != spec["per_device_batch"]:
        log.warning(
            "%s: shards on disk were written with per_device_batch %s, this run uses %s: the "
            "new shards may differ from an uninterrupted run in the last float bits "
            "(docs/scale.md, Determinism)",
            out_dir, old.get("per_device_batch"), spec["per_device_batch"],
        )  # fmt: skip


def _scan_shards(
    out_dir: str, shards: Sequence[int], bounds: Sequence[tuple[int, int]], spec: dict
) -> tuple[list[int], list[int]]:
    """``(pending, skipped)`` among ``shards``: verified ones are skipped; damaged ones are
    moved aside (logged) and redone; a foreign one raises :class:`DifferentRunError`."""
    pending, skipped = [], []
    for k in shards:
        path = os.path.join(out_dir, shard_name(k))
        check = check_shard(path, spec["fingerprint"], *bounds[k])
        if check.state == "ok":
            skipped.append(k)
            continue
        if check.state == "foreign":
            lines = engine.describe_differences(check.identity, identity_of(spec))
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


def _drop_unusable_manifest(out_dir: str, num_samples: int) -> None:
    """Remove a torn manifest (warning) or one of an earlier, different ``num_samples``; the
    manifest is rebuilt from the verified shards at the end."""
    path = os.path.join(out_dir, MANIFEST_FILE)
    manifest, why = _read_json(path)
    if why is not None:
        log.warning("%s is damaged (%s): removed; it is rebuilt from the verified shards",
                    path, why)  # fmt: skip
        os.unlink(path)
    elif manifest is not None and (
        not isinstance(manifest, dict) or manifest.get("num_samples") != num_samples
    ):
        os.unlink(path)


# --- generation ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    out_dir: str
    num_samples: int
    num_shards: int
    written: tuple[int, ...]  # shards this process generated in this call
    skipped: tuple[int, ...]  # shards of this process found complete and verified on disk
    calls: int  # jitted sampling calls made by this process
    seconds: float
    manifest: dict | None  # the manifest (process 0, when complete), else None


def generate_samples(
    out_dir: str,
    sampler: Sampler,
    *,
    num_samples: int,
    sample_shape: Sequence[int],
    seed: int,
    shard_size: int = 1000,
    per_device_batch: int = 64,
    mesh: jax.sharding.Mesh | None = None,
    prior: Callable[[jax.Array], jax.Array] | None = None,
    params: Any = None,
    bind: Callable[[Any], Callable] | None = None,
    dtype=jnp.float32,
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    metadata: dict | None = None,
    progress: bool = True,
    on_shard: Callable[[int, str], None] | None = None,
) -> GenerationResult:
    """Generate ``num_samples`` samples into ``out_dir`` (see the module docstring).

    ``per_device_batch`` samples go to each device per jitted call (a call makes
    ``per_device_batch * device_count`` samples over all processes). It is a per-device number
    on purpose: XLA's CPU/GPU code for a batched op can depend on its shape, so keeping the
    per-device shape fixed is what makes the samples bit-identical across device counts (see
    ``docs/scale.md``). ``prior``, ``bind``, ``params``: as in
    :func:`deis_jax.parallel.make_generate_fn`.
    ``postprocess`` maps a shard's float samples (host numpy, checked finite first) to what is
    stored (e.g. uint8 images). ``metadata`` (JSON-able) must name everything else that changes
    a sample -- the parameters' hash and checkpoint, the config: it goes into the spec, the
    fingerprint and the manifest, and a restart with other metadata is refused. ``on_shard(k,
    path)`` runs after each shard and its sidecar are written (tests use it to interrupt).

    Raises :class:`DifferentRunError` (the directory holds another run, naming what differs)
    and :class:`NonFiniteShardError` (a shard with NaN / Inf samples, not written).
    """
    t_start = time.perf_counter()
    num_samples, shard_size = int(num_samples), int(shard_size)
    if num_samples < 1 or shard_size < 1:
        raise ValueError("num_samples and shard_size must be >= 1")
    mesh = parallel.make_mesh() if mesh is None else mesh
    nproc, pid = jax.process_count(), jax.process_index()
    if int(per_device_batch) < 1:
        raise ValueError(f"per_device_batch must be >= 1, got {per_device_batch}")
    if mesh.size % nproc:
        raise ValueError(f"{mesh.size} devices do not split evenly over {nproc} processes")
    batch = int(per_device_batch) * mesh.size  # samples per call, all processes together
    local_batch = batch // nproc
    sample_shape = tuple(int(s) for s in sample_shape)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"output directory {out_dir} is a file: choose another path")
    os.makedirs(out_dir, exist_ok=True)

    spec = {
        "format_version": FORMAT_VERSION,
        "num_samples": num_samples,
        "num_samples_per_shard": shard_size,
        "seed": int(seed),
        "sample_shape": list(sample_shape),
        "dtype": jnp.dtype(dtype).name,
        "sampler": sampler_info(sampler),
        "metadata": _jsonable(metadata or {}),
        "git_revision": git_revision(),
        "process_count": nproc,
        "device_count": mesh.size,
        "per_device_batch": int(per_device_batch),
    }
    spec["fingerprint"] = fingerprint = engine.fingerprint(identity_of(spec))
    identity_json = json.dumps(identity_of(spec), sort_keys=True)
    _check_spec(out_dir, spec)
    bounds = shard_bounds(num_samples, shard_size)
    refused = None
    try:
        pending, skipped = _scan_shards(
            out_dir, parallel.process_range(len(bounds), pid, nproc), bounds, spec
        )
    except DifferentRunError as err:
        refused = err
    if parallel.allgather_ints([refused is not None]).any():  # every process stops, together
        raise refused or DifferentRunError(
            f"another process found shards of a different run in {out_dir}: see its log"
        )
    if pid == 0:
        atomic_write_text(
            os.path.join(out_dir, SPEC_FILE), json.dumps(spec, indent=1, sort_keys=True)
        )
        _clean_temp_files(out_dir)
        _drop_unusable_manifest(out_dir, num_samples)

    # Every process must make the same number of jitted calls over the global mesh.
    stream = np.concatenate(
        [np.arange(*bounds[k], dtype=np.int64) for k in pending] or [np.zeros(0, np.int64)]
    )
    pending_per_process = parallel.allgather_ints([len(stream)])[:, 0]
    calls = int(-(-pending_per_process.max() // local_batch))

    generate = parallel.make_generate_fn(
        sampler, mesh, sample_shape, prior=prior, bind=bind, dtype=dtype
    )
    prior_key, noise_key = parallel.replicate(parallel.sample_keys(seed), mesh)
    params = parallel.replicate(params, mesh) if params is not None else None

    bar = None
    if progress and pid == 0 and calls:
        done_before = num_samples - int(pending_per_process.sum())
        bar = tqdm(
            total=num_samples, initial=done_before, desc="generate", unit="sample",
            unit_scale=True, dynamic_ncols=True, file=sys.stderr,
        )  # fmt: skip

    pending_set = set(pending)
    buffers: dict[int, np.ndarray] = {}  # shard -> samples received so far
    filled: dict[int, np.ndarray] = {}  # shard -> which rows arrived
    written: list[int] = []

    def write_shard(k: int, samples: np.ndarray) -> None:
        start, stop = bounds[k]
        path = os.path.join(out_dir, shard_name(k))
        _refuse_nonfinite(samples, start, path)
        if postprocess is not None:
            samples = np.asarray(postprocess(samples))
        arrays = {
            "samples": samples,
            "indices": np.arange(start, stop, dtype=np.int64),
            "fingerprint": np.array(fingerprint),
            "identity": np.array(identity_json),
        }
        _write_shard(path, arrays)
        written.append(k)
        if on_shard is not None:
            on_shard(k, path)

    def consume(out) -> None:
        """Copy this process's rows of one call into their shards; write full shards.

        Rows are placed by the indices the call returns (no assumption on device order);
        padding rows repeat a valid index and just rewrite the same values."""
        rows = parallel.local_rows(out[0])
        got = parallel.local_rows(out[1]).astype(np.int64)
        for k in np.unique(got // shard_size).tolist():
            if k not in pending_set:  # padding of a process with nothing left
                continue
            sel = got // shard_size == k
            start, stop = bounds[k]
            if k not in buffers:
                buffers[k] = np.empty((stop - start, *rows.shape[1:]), rows.dtype)
                filled[k] = np.zeros(stop - start, bool)
            buffers[k][got[sel] - start] = rows[sel]
            filled[k][got[sel] - start] = True
            if filled[k].all():
                del filled[k]
                write_shard(k, buffers.pop(k))

    previous = None
    for c in range(calls):
        chunk = stream[c * local_batch : (c + 1) * local_batch]
        # Pad to the common batch by repeating a valid index: computed, then dropped.
        filler = np.full(local_batch - len(chunk), chunk[-1] if len(chunk) else 0, np.int64)
        local = np.concatenate([chunk, filler]).astype(np.int32)
        out = generate(params, prior_key, noise_key, parallel.shard_local_batch(local, mesh))
        if previous is not None:  # read the previous call while this one runs
            consume(previous)
        previous = out
        if bar is not None:
            left = np.maximum(pending_per_process - c * local_batch, 0)
            bar.update(int(np.minimum(left, local_batch).sum()))
    if previous is not None:
        consume(previous)
    if bar is not None:
        bar.close()
    if buffers:
        raise AssertionError(f"internal error: shards {sorted(buffers)} left incomplete")

    parallel.barrier("deis_generation_shards_written")
    manifest = None
    if pid == 0:
        manifest = finalize(out_dir)
    parallel.barrier("deis_generation_manifest_written")
    return GenerationResult(
        out_dir=out_dir,
        num_samples=num_samples,
        num_shards=len(bounds),
        written=tuple(written),
        skipped=tuple(skipped),
        calls=calls,
        seconds=time.perf_counter() - t_start,
        manifest=manifest,
    )


# --- manifest -----------------------------------------------------------------------------


def finalize(out_dir: str) -> dict | None:
    """Verify every shard of ``spec.json`` (:func:`check_shard`), then write the manifest with
    the verified hashes.

    Returns the manifest, or ``None`` (and writes nothing) when a shard is missing or fails
    its check -- the log says which and why. Never moves or changes a shard. Safe to run
    again: ``python -m deis_jax.experiments.generation finalize DIR``."""
    spec, why = _read_json(os.path.join(out_dir, SPEC_FILE))
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
    manifest, why = _read_json(path)
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deis_jax.experiments.generation finalize DIR`` | ``verify DIR``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("finalize", "verify"):
        print(
            "usage: python -m deis_jax.experiments.generation {finalize,verify} DIR",
            file=sys.stderr,
        )
        return 2
    command, out_dir = argv
    try:
        if command == "finalize":
            manifest = finalize(out_dir)
            if manifest is None:
                return 1
            print(f"wrote {os.path.join(out_dir, MANIFEST_FILE)}: {manifest['count']} samples")
            return 0
        result = load_samples(out_dir)
    except IncompleteSamplesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{out_dir}: {len(result.samples)} samples verified")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
