"""Resumable, sharded, multi-device / multi-host sample generation: the generation loop, the
run spec and its fingerprint, and the ``finalize`` / ``verify`` command line.

    from deis_jax.experiments import generation
    result = generation.generate_samples(
        "runs/cifar10/samples/tab3_nfe10", sampler, num_samples=50_000, sample_shape=(32, 32, 3),
        seed=0, shard_size=1000, per_device_batch=128, params=params, bind=lambda p: eps_fn_of(p),
        postprocess=to_uint8, metadata={"config": config.to_dict(), "params_sha256": digest},
    )
    samples = generation.load_samples("runs/cifar10/samples/tab3_nfe10").samples  # (50000, ...)

How the finished shards, their sha256 sidecars and the manifest are laid out, written and
verified (restart checks, damaged files moved aside, :func:`load_samples`, :func:`finalize`)
is :mod:`deis_jax.experiments.shard_store`; ``load_samples`` and ``DifferentRunError`` are
also reachable from here, where existing callers import them.

The run spec (``spec.json``) says what is being generated (seed, sampler, shapes, shard size,
user metadata, git revision) and carries its ``fingerprint``, the hash of the settings that
change a sample (:data:`IDENTITY_KEYS`; ``metadata`` is where a caller puts the parameters'
hash, the checkpoint step...). A restart whose fingerprint differs is refused before any work,
with one line per differing setting (:func:`deis_jax.common.identity.describe_differences`);
an unreadable ``spec.json`` (it carries no results) is rewritten from this run with a warning
-- the shards' own fingerprints still guard against mixing.

Randomness: ``x_T`` of sample ``i`` comes from ``fold_in(prior_key, i)`` and a stochastic
sampler's noise from ``fold_in(fold_in(noise_key, i), step)`` with ``(prior_key, noise_key) =
split(PRNGKey(seed))`` (as ``--mode=sample``): the randomness depends on neither the device
count, the process count nor on where a restart happened, and with the same
``per_device_batch`` the samples are bit-identical across partitioned runs (``docs/scale.md``,
"Determinism").

**Non-finite samples** are never written: a shard with a NaN / Inf sample raises
:class:`NonFiniteShardError` (a ``diagnostics.NonFiniteSamplesError``) naming their global
indices, and nothing is written for it.

Several processes (``jax.distributed``): the shards are split into contiguous blocks, one per
process (:func:`deis_jax.common.parallel.process_range`); every process checks and writes its own
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

from deis_jax.common import identity, parallel
from deis_jax.common.files import atomic_write_text
from deis_jax.common.progress import progress_bar
from deis_jax.experiments.shard_store import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    SPEC_FILE,
    DifferentRunError,
    IncompleteSamplesError,
    clean_temp_files,
    drop_unusable_manifest,
    finalize,
    load_samples,
    read_json,
    scan_shards,
    shard_bounds,
    shard_name,
    write_shard,
)
from deis_jax.sampling import sharded
from deis_jax.sampling.diagnostics import NonFiniteSamplesError, nonfinite_samples
from deis_jax.sampling.sampler import Sampler

IDENTITY_KEYS = ("num_samples_per_shard", "seed", "sample_shape", "dtype", "sampler", "metadata")

log = logging.getLogger(__name__)


class NonFiniteShardError(NonFiniteSamplesError):
    """A shard's samples are not all finite; nothing is written for it. ``indices`` are the
    global indices of the bad samples, ``path`` the shard that was not written."""

    def __init__(self, indices: Sequence[int], path: str, start: int, count: int):
        super().__init__(indices)
        self.path = path
        self.args = (
            f"{path} not written (its {count} samples from global index {start}): {self.args[0]}",
        )


# --- the run spec -------------------------------------------------------------------------


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
    table_sha256 = identity.float64_digest(
        [sampler.ts, *jax.tree.leaves((sampler.table, sampler.rule_params))]
    )
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
        "table_sha256": table_sha256,
    }


def identity_of(spec: dict) -> dict:
    """The settings of ``spec`` that change a sample (:data:`IDENTITY_KEYS`)."""
    return {k: spec.get(k) for k in IDENTITY_KEYS}


def _refuse_nonfinite(samples: np.ndarray, start: int, path: str) -> None:
    """Raise :class:`NonFiniteShardError` (global indices) if a sample of a shard is not
    finite."""
    bad = nonfinite_samples(samples)
    if bad.size:
        raise NonFiniteShardError(start + bad, path, start, len(samples))


# --- restart: the spec on disk -----------------------------------------------------------


def _check_spec(out_dir: str, spec: dict) -> None:
    """Refuse a directory whose ``spec.json`` describes another run, naming every differing
    setting; warn about a torn ``spec.json`` (rewritten later) and a changed per-device batch
    (same samples up to float rounding)."""
    path = os.path.join(out_dir, SPEC_FILE)
    old, why = read_json(path)
    if old is not None and not (
        isinstance(old, dict) and identity.fingerprint(identity_of(old)) == old.get("fingerprint")
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
        lines = identity.describe_differences(identity_of(old), identity_of(spec))
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
    bind: Callable[..., Callable] | None = None,
    labels: Callable[[jax.Array], jax.Array] | None = None,
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
    ``docs/scale.md``). ``prior``, ``bind``, ``params``, ``labels`` (the classes of a
    class-conditional network, keyed by the global index): as in
    :func:`deis_jax.sampling.sharded.make_generate_fn`.
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
    spec["fingerprint"] = fingerprint = identity.fingerprint(identity_of(spec))
    _check_spec(out_dir, spec)
    bounds = shard_bounds(num_samples, shard_size)
    refused = None
    try:
        pending, skipped = scan_shards(
            out_dir,
            parallel.process_range(len(bounds), pid, nproc),
            bounds,
            fingerprint,
            identity_of(spec),
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
        clean_temp_files(out_dir)
        drop_unusable_manifest(out_dir, num_samples)

    # Every process must make the same number of jitted calls over the global mesh.
    stream = np.concatenate(
        [np.arange(*bounds[k], dtype=np.int64) for k in pending] or [np.zeros(0, np.int64)]
    )
    pending_per_process = parallel.allgather_ints([len(stream)])[:, 0]
    calls = int(-(-pending_per_process.max() // local_batch))

    generate = sharded.make_generate_fn(
        sampler, mesh, sample_shape, prior=prior, bind=bind, labels=labels, dtype=dtype
    )
    prior_key, noise_key = parallel.replicate(sharded.sample_keys(seed), mesh)
    params = parallel.replicate(params, mesh) if params is not None else None

    bar = None
    if progress and pid == 0 and calls:
        done_before = num_samples - int(pending_per_process.sum())
        bar = progress_bar(num_samples, "generate", "sample", initial=done_before)

    pending_set = set(pending)
    buffers: dict[int, np.ndarray] = {}  # shard -> samples received so far
    filled: dict[int, np.ndarray] = {}  # shard -> which rows arrived
    written: list[int] = []

    def store_shard(k: int, samples: np.ndarray) -> None:
        start, stop = bounds[k]
        path = os.path.join(out_dir, shard_name(k))
        _refuse_nonfinite(samples, start, path)
        if postprocess is not None:
            samples = np.asarray(postprocess(samples))
        write_shard(path, samples, start, stop, fingerprint, identity_of(spec))
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
                store_shard(k, buffers.pop(k))

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
