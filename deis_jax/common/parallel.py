"""Data parallelism with ``jax.sharding``: one ``('data',)`` mesh over every device, any host.

Sampling is embarrassingly parallel over samples, so the whole story is data parallelism:

* :func:`make_mesh` -- a 1-D ``jax.make_mesh`` mesh named ``'data'`` over all devices (of
  every process, after :func:`maybe_initialize_distributed`).
* :func:`batch_sharding` / :func:`replicated_sharding` -- ``NamedSharding(mesh, P('data'))``
  for anything with a leading batch axis, ``NamedSharding(mesh, P())`` for parameters, keys
  and scalars. :func:`shard_batch` (a full batch every process holds),
  :func:`shard_local_batch` (this process's rows only), :func:`replicate` (parameters) put
  host data there; :func:`local_rows` and :func:`gather` bring results back.
* :func:`maybe_initialize_distributed` -- ``jax.distributed.initialize()`` when the
  environment describes several processes, a no-op on one machine.
* :func:`process_range` -- the contiguous slice of a global index range that one process owns.
* :func:`simulated_device_flags` -- ``XLA_FLAGS`` for a child process that simulates N CPU
  devices, keeping the caller's other XLA flags.

Determinism (DESIGN principle 4): ``x_T`` of sample ``i`` is drawn from
``fold_in(prior_key, i)`` and the sampler's noise at step ``k`` from
``fold_in(fold_in(noise_key, i), k)``, so the *randomness* never depends on the batch size,
device count or process count. The float *arithmetic* depends on the per-device batch shape,
not on the device count: when every call puts the same number of rows on each device
(``generate_samples``' ``per_device_batch``; for :func:`shard_sampler`, the same
``len(x_T) // mesh.size``), the union of the sharded results is the 1-device result bit for
bit, on 1, 2 or 8 devices and on 2 ``jax.distributed`` processes. The same *global* batch
split over another number of devices has another per-device shape, which XLA may compile into
code that rounds differently: those results agree to float32 rounding grown through the solve
(up to ~1e-4 for unit-scale samples), not bit for bit. Measured on CPU with the exact
mixture eps (``docs/scale.md``, "Determinism"; ``tests/test_parallel.py``).

No ``pmap`` and no process pools: XLA partitions the jitted computation (GSPMD); with several
processes every process runs the same jitted calls in the same order (multi-controller SPMD).
"""

from __future__ import annotations

import dataclasses
import logging as pylogging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

_log = pylogging.getLogger(__name__)


# --- mesh and shardings -------------------------------------------------------------------


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D ``('data',)`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``'data'``, every other axis whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Put a pytree (parameters, keys) on every device of ``mesh``.

    With several processes every process must pass the same values."""
    return jax.device_put(tree, replicated_sharding(mesh))


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // int(multiple)) * int(multiple)


def shard_batch(x, mesh: jax.sharding.Mesh) -> jax.Array:
    """A full global batch that *every* process holds -> one array sharded ``P('data')``.

    ``x.shape[0]`` must be divisible by ``mesh.size`` (pad with :func:`pad_batch`)."""
    if x.shape[0] % mesh.size:
        raise ValueError(
            f"batch of {x.shape[0]} rows does not split over {mesh.size} devices; pad it "
            f"(deis_jax.common.parallel.pad_batch) to a multiple of {mesh.size}"
        )
    return jax.device_put(x, batch_sharding(mesh))


def shard_local_batch(local, mesh: jax.sharding.Mesh) -> jax.Array:
    """This process's rows -> the global array (rows of all processes) sharded ``P('data')``.

    Every process passes the same number of rows, a multiple of its local device count."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local))


def pad_batch(x, multiple: int):
    """Pad the leading axis to a multiple of ``multiple`` by repeating the last row.

    Returns ``(padded, n)``: keep ``out[:n]``. Padding rows are computed and discarded (every
    row is independent, so they never change the real rows)."""
    n = x.shape[0]
    extra = round_up(n, multiple) - n
    if extra == 0:
        return x, n
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)]), n


def local_rows(x: jax.Array) -> np.ndarray:
    """The rows of a ``P('data')``-sharded array that live on this process, in global order."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = [s for s in x.addressable_shards if s.replica_id == 0]
    shards.sort(key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def gather(x: jax.Array) -> np.ndarray:
    """The whole array as numpy on every process (an all-gather when it spans processes)."""
    if x.is_fully_addressable:
        return np.asarray(x)

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def barrier(name: str) -> None:
    """Wait for every process (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def allgather_ints(values) -> np.ndarray:
    """``(process_count, len(values))`` int64: every process's ``values``, on every process."""
    values = np.asarray(values, np.int64).reshape(-1)
    if jax.process_count() == 1:
        return values[None]

    # int32 on the wire (int64 needs x64); callers' counts fit.
    out = multihost_utils.process_allgather(values.astype(np.int32))
    return np.asarray(out, np.int64).reshape(jax.process_count(), -1)


def broadcast_from_process_0(value: np.ndarray) -> np.ndarray:
    """Process 0's ``value`` on every process (identity with one process)."""
    if jax.process_count() == 1:
        return np.asarray(value)

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


# --- index partitioning -------------------------------------------------------------------


def process_range(
    num: int, process_index: int | None = None, process_count: int | None = None
) -> range:
    """The contiguous block of ``range(num)`` owned by ``process_index``.

    Blocks are consecutive and cover ``range(num)`` exactly once; the first ``num %
    process_count`` processes get one element more. Because the randomness of sample ``i``
    depends only on ``i``, the union of what the processes generate equals a single-process
    run."""
    p = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p < count:
        raise ValueError(f"process_index {p} is not in [0, {count})")
    base, extra = divmod(int(num), count)
    start = p * base + min(p, extra)
    return range(start, start + base + (1 if p < extra else 0))


# --- multi-process start-up ---------------------------------------------------------------

ENV_SWITCH = "DEIS_DISTRIBUTED"  # 1/on: always initialize; 0/off: never; unset: auto-detect
ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"  # also read by jax.distributed.initialize itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    """What :func:`maybe_initialize_distributed` will do, decided from arguments + env."""

    initialize: bool
    kwargs: dict
    reason: str


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def simulated_device_flags(flags: str | None, devices: int | None) -> str:
    """``flags`` (an ``XLA_FLAGS`` value, ``None`` for unset) with ``devices`` simulated host
    devices: any earlier device-count flag is dropped, every other flag kept (so a child
    process runs under the same floating-point configuration as its parent, e.g. the
    ``--xla_cpu_max_isa`` of the test suite's numerics pass); ``devices=None`` only drops it."""
    kept = [f for f in (flags or "").split() if not f.startswith(DEVICE_COUNT_FLAG + "=")]
    if devices is not None:
        kept.append(f"{DEVICE_COUNT_FLAG}={int(devices)}")
    return " ".join(kept)


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def distributed_plan(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> DistributedPlan:
    """Decide whether (and how) to call ``jax.distributed.initialize`` -- pure, testable.

    In order:

    1. ``DEIS_DISTRIBUTED=0|off|false`` -> never.
    2. explicit ``coordinator_address``/``num_processes``/``process_id`` (arguments or the
       ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` env variables):
       initialize with them when ``num_processes > 1``; ``num_processes == 1`` is a no-op.
    3. ``DEIS_DISTRIBUTED=1|on|true`` -> ``initialize()`` with JAX's own cluster detection
       (Cloud TPU VMs incl. pod slices, GKE, SLURM, Open MPI). Use this on TPU pods.
    4. auto-detection of environments that *say* there are several processes: SLURM
       (``SLURM_NTASKS > 1`` inside ``srun``), Open MPI (``OMPI_COMM_WORLD_SIZE > 1``), GKE
       TPU slices (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` with several hosts).
    5. otherwise: one process, nothing to do.
    """
    env = os.environ if environ is None else environ
    switch = env.get(ENV_SWITCH, "").strip().lower()
    if switch in ("0", "off", "false", "no"):
        return DistributedPlan(False, {}, f"{ENV_SWITCH}={switch}")
    address = coordinator_address or env.get(ENV_ADDRESS) or None
    count = num_processes if num_processes is not None else _int_env(env, ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _int_env(env, ENV_PROCESS_ID)
    if count is not None:
        if count < 1:
            raise ValueError(f"num_processes must be >= 1, got {count}")
        if count == 1:
            return DistributedPlan(False, {}, "num_processes=1")
        missing = [
            n for n, v in (("coordinator_address", address), ("process_id", pid)) if v is None
        ]
        if missing:
            raise ValueError(
                f"num_processes={count} needs {' and '.join(missing)} too (arguments or the "
                f"{ENV_ADDRESS} / {ENV_PROCESS_ID} environment variables)"
            )
        if not 0 <= pid < count:
            raise ValueError(f"process_id must be in [0, {count}), got {pid}")
        kwargs = dict(coordinator_address=address, num_processes=count, process_id=pid)
        return DistributedPlan(True, kwargs, f"explicit: {count} processes, this is {pid}")
    if switch in ("1", "on", "true", "yes"):
        kwargs = {"coordinator_address": address} if address else {}
        return DistributedPlan(True, kwargs, f"{ENV_SWITCH}={switch}: JAX cluster detection")
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and (_int_env(env, "SLURM_NTASKS") or 1) > 1:
        return DistributedPlan(True, {}, f"SLURM with {env['SLURM_NTASKS']} tasks")
    if "OMPI_MCA_orte_hnp_uri" in env and (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return DistributedPlan(True, {}, f"Open MPI with {env['OMPI_COMM_WORLD_SIZE']} ranks")
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in env.get(name, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return DistributedPlan(True, {}, f"TPU slice with {len(hosts)} hosts ({name})")
    return DistributedPlan(False, {}, "single process (no multi-process environment detected)")


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Call ``jax.distributed.initialize`` when :func:`distributed_plan` says so.

    Must run before any JAX computation (``main.py`` calls it first thing). Returns whether
    the distributed system is initialized. Idempotent."""
    if jax.distributed.is_initialized():
        return True
    plan = distributed_plan(coordinator_address, num_processes, process_id, environ=environ)
    if not plan.initialize:
        _log.debug("jax.distributed not initialized: %s", plan.reason)
        return False
    _log.info("jax.distributed.initialize(%s): %s", plan.kwargs, plan.reason)
    try:
        jax.distributed.initialize(**plan.kwargs)
    except RuntimeError as err:
        if "must be called before" in str(err):
            raise RuntimeError(
                "jax.distributed.initialize() must run before any JAX computation: call "
                "deis_jax.common.parallel.maybe_initialize_distributed() at the very start of the "
                f"program (main.py does). Original error: {err}"
            ) from err
        raise
    return True
