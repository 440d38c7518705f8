"""Resumable, sharded, multi-device / multi-host sample generation with a verified manifest.

    from deis_jax.experiments import generation
    result = generation.generate_samples(
        "runs/cifar10/samples/tab3_nfe10", sampler, num_samples=50_000, sample_shape=(32, 32, 3),
        seed=0, shard_size=1000, per_device_batch=128, params=params, bind=lambda p: eps_fn_of(p),
        postprocess=to_uint8, metadata={"config": config.to_dict()},
    )
    samples = generation.load_samples("runs/cifar10/samples/tab3_nfe10").samples  # (50000, ...)

Layout of ``out_dir``:

* ``spec.json`` -- what is being generated (seed, sampler, shapes, shard size, user
  metadata, git revision) and its ``fingerprint``; a restart with a different spec in the same
  directory is refused before any work.
* ``shard_000000.npz`` ... -- shard ``k`` holds the samples with global indices
  ``[k * shard_size, min((k + 1) * shard_size, num_samples))``: arrays ``samples``,
  ``indices`` (int64) and ``fingerprint``. Written atomically (temporary file in the same
  directory, fsync, rename), so a shard on disk is always complete.
* ``manifest.json`` -- written last, once every shard exists: the spec plus the list of shards
  with their counts, sizes and sha256. :func:`load_samples` refuses a directory without it and
  checks every hash and that the indices are exactly ``0 .. num_samples - 1``.

Randomness: ``x_T`` of sample ``i`` comes from ``fold_in(prior_key, i)`` and a stochastic
sampler's noise from ``fold_in(fold_in(noise_key, i), step)`` with ``(prior_key, noise_key) =
split(PRNGKey(seed))`` (as ``--mode=sample``): the randomness depends on neither the device
count, the process count nor on where a restart happened, and with the same
``per_device_batch`` the samples are bit-identical across partitioned runs (``docs/scale.md``,
"Determinism").

Restart: shards already on disk (same fingerprint, same index range) are skipped -- nothing
finished is recomputed and nothing is lost; a killed writer leaves at most a ``.tmp-*`` file,
which is ignored and cleaned up.

Several processes (``jax.distributed``): the shards are split into contiguous blocks, one per
process (:func:`deis_jax.parallel.process_range`); every process writes its own shards (to a
shared file system: NFS, Filestore, gcsfuse...). All processes run the same number of jitted
calls over the global mesh (a process with less left to do pads with dummy rows) -- the pending
counts are exchanged once with an all-gather. At the end a barrier, then **process 0 writes the
manifest** after re-reading and hashing every shard. If the processes do not share a file
system, copy all shards into one directory and run
``python -m deis_jax.experiments.generation finalize DIR`` (the same check-and-write step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
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
from deis_jax.io_utils import atomic_write_bytes, atomic_write_text, sha256_file
from deis_jax.sampling.sampler import Sampler

FORMAT_VERSION = 1
SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"


class IncompleteSamplesError(RuntimeError):
    """The sample directory is missing shards, has no manifest, or fails verification."""


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
    """JSON description of a sampler, with a hash of its float64 time grid and coefficients."""
    h = hashlib.sha256(np.ascontiguousarray(sampler.ts, np.float64).tobytes())
    for leaf in jax.tree.leaves(sampler.table):
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


_IDENTITY_KEYS = ("num_samples_per_shard", "seed", "sample_shape", "dtype", "sampler", "metadata")


def _encode_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _read_shard_header(path: str) -> tuple[str, np.ndarray] | None:
    """``(fingerprint, indices)`` of a shard file, reading only those two members."""
    try:
        with np.load(path) as f:
            return str(f["fingerprint"]), np.asarray(f["indices"])
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _shard_state(path: str, fingerprint: str, start: int, stop: int) -> str:
    """``'done'`` (valid, skip), ``'missing'`` (generate), ``'stale'`` (other range: redo)."""
    if not os.path.exists(path):
        return "missing"
    header = _read_shard_header(path)
    if header is None:
        return "stale"
    fp, indices = header
    if fp != fingerprint:
        raise RuntimeError(
            f"{path} was written by a different generation run (fingerprint {fp}, this run "
            f"{fingerprint}); use a new output directory"
        )
    ok = indices.shape == (stop - start,) and np.array_equal(indices, np.arange(start, stop))
    return "done" if ok else "stale"


def _clean_temp_files(out_dir: str) -> None:
    """Remove what a killed writer left: ``io_utils`` temporaries ``.tmp-<random>shard_*``."""
    for name in os.listdir(out_dir):
        if name.startswith(".tmp-") and "shard_" in name and name.endswith(".npz"):
            try:
                os.unlink(os.path.join(out_dir, name))
            except OSError:
                pass


# --- generation ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    out_dir: str
    num_samples: int
    num_shards: int
    written: tuple[int, ...]  # shards this process generated in this call
    skipped: tuple[int, ...]  # shards of this process found complete on disk
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
    ``postprocess`` maps a shard's float samples (host numpy) to what is stored (e.g. uint8
    images). ``metadata`` (JSON-able: the config, the checkpoint path...) goes into the spec,
    the fingerprint and the manifest. ``on_shard(k, path)`` runs after each shard is written
    (tests use it to interrupt).
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
    spec["fingerprint"] = engine.fingerprint({k: spec[k] for k in _IDENTITY_KEYS})
    fingerprint = spec["fingerprint"]
    spec_path = os.path.join(out_dir, SPEC_FILE)
    if os.path.exists(spec_path):
        with open(spec_path) as f:
            old = json.load(f).get("fingerprint")
        if old != fingerprint:
            raise RuntimeError(
                f"{out_dir} holds samples of a different generation run (fingerprint {old}, "
                f"this run {fingerprint}: seed, sampler, shapes, shard size or metadata "
                f"differ); use a new output directory"
            )
    parallel.barrier("deis_generation_spec_checked")
    if pid == 0:
        atomic_write_text(spec_path, json.dumps(spec, indent=1, sort_keys=True))
        _clean_temp_files(out_dir)
        manifest_path = os.path.join(out_dir, MANIFEST_FILE)
        if os.path.exists(manifest_path):  # an earlier run with another num_samples
            with open(manifest_path) as f:
                if json.load(f).get("num_samples") != num_samples:
                    os.unlink(manifest_path)

    bounds = shard_bounds(num_samples, shard_size)
    mine = parallel.process_range(len(bounds), pid, nproc)
    pending, skipped = [], []
    for k in mine:
        path = os.path.join(out_dir, shard_name(k))
        state = _shard_state(path, fingerprint, *bounds[k])
        (skipped if state == "done" else pending).append(k)

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
        if postprocess is not None:
            samples = np.asarray(postprocess(samples))
        data = _encode_npz(
            {
                "samples": samples,
                "indices": np.arange(start, stop, dtype=np.int64),
                "fingerprint": np.array(fingerprint),
            }
        )
        path = os.path.join(out_dir, shard_name(k))
        atomic_write_bytes(path, data)
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
    """Check that every shard of ``spec.json`` is on disk and valid, then write the manifest.

    Returns the manifest, or ``None`` (and writes nothing) when shards are missing -- the
    message says which. Safe to run again:
    ``python -m deis_jax.experiments.generation finalize DIR``."""
    with open(os.path.join(out_dir, SPEC_FILE)) as f:
        spec = json.load(f)
    n, size, fingerprint = spec["num_samples"], spec["num_samples_per_shard"], spec["fingerprint"]
    shards, missing = [], []
    for k, (start, stop) in enumerate(shard_bounds(n, size)):
        path = os.path.join(out_dir, shard_name(k))
        if _shard_state(path, fingerprint, start, stop) != "done":
            missing.append(shard_name(k))
            continue
        shards.append(
            {
                "file": shard_name(k),
                "start": start,
                "stop": stop,
                "count": stop - start,
                "bytes": os.path.getsize(path),
                "sha256": sha256_file(path),
            }
        )
    if missing:
        logging.getLogger(__name__).error(
            "%s: %d of %d shards missing (%s...); no manifest written. Run the generation "
            "again (it resumes), or copy the shards of every host here and run "
            "`python -m deis_jax.experiments.generation finalize %s`.",
            out_dir, len(missing), len(missing) + len(shards), ", ".join(missing[:3]), out_dir,
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
    """The manifest of a finished generation run."""
    path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        raise IncompleteSamplesError(
            f"{out_dir} has no {MANIFEST_FILE}: the generation did not finish (run it again, it "
            f"resumes) or was not finalized "
            f"(`python -m deis_jax.experiments.generation finalize {out_dir}`)"
        )
    with open(path) as f:
        return json.load(f)


def load_samples(out_dir: str, *, verify: bool = True) -> Samples:
    """All samples of a finished generation, in global index order, after verification.

    Checks (``verify=True``): the manifest exists, every listed shard exists with its sha256,
    the shards' indices are exactly ``0 .. num_samples - 1``. Any failure raises
    :class:`IncompleteSamplesError` naming the problem."""
    manifest = load_manifest(out_dir)
    n = manifest["num_samples"]
    if manifest["count"] != n or sum(s["count"] for s in manifest["shards"]) != n:
        raise IncompleteSamplesError(f"{out_dir}: manifest counts do not add up to {n}")
    parts, covered = [], 0
    for entry in sorted(manifest["shards"], key=lambda s: s["start"]):
        path = os.path.join(out_dir, entry["file"])
        if not os.path.exists(path):
            raise IncompleteSamplesError(f"{out_dir}: shard {entry['file']} is missing")
        if verify and sha256_file(path) != entry["sha256"]:
            raise IncompleteSamplesError(f"{out_dir}: shard {entry['file']} fails its sha256")
        with np.load(path) as f:
            samples, indices = f["samples"], f["indices"]
        if entry["start"] != covered or not np.array_equal(
            indices, np.arange(entry["start"], entry["stop"])
        ):
            raise IncompleteSamplesError(
                f"{out_dir}: shard {entry['file']} covers the wrong indices (expected from "
                f"{covered})"
            )
        covered = entry["stop"]
        parts.append(samples)
    if covered != n:
        raise IncompleteSamplesError(f"{out_dir}: shards cover {covered} of {n} samples")
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
    if command == "finalize":
        manifest = finalize(out_dir)
        if manifest is None:
            return 1
        print(f"wrote {os.path.join(out_dir, MANIFEST_FILE)}: {manifest['count']} samples")
        return 0
    result = load_samples(out_dir)
    print(f"{out_dir}: {len(result.samples)} samples verified")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
