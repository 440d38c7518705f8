"""The one teacher every fitting method shares: accurate trajectories on a fine grid, cached.

A teacher for a frozen ``eps_fn`` and starting points ``x_T`` (n of them) is the probability-
flow ODE solved accurately from ``t1`` to ``t0``, recorded on a fine grid of ``M`` times
``ts[0] = t1 > ... > ts[M-1] = t0`` (default: 61 points uniform in log-SNR):

* ``states[:, k]`` -- the solution at ``ts[k]`` (``states[:, 0] = x_T``, ``states[:, -1] = x0``);
* ``eps[:, k] = eps_fn(states[:, k], ts[k])`` for ``k = 0 .. M-2`` -- what grid searches such
  as GITS read (one jump from node k needs the model output there, never at ``t0``);
* ``x0`` -- the endpoint, all that LD3-style endpoint losses need (``keep_states=False``).

The solver is classical RK4 in ``rho = sigma/alpha`` (``rhork``, order 4) on a *refined* grid
that splits every fine interval ``[ts[k], ts[k+1]]`` into ``substeps`` sub-intervals equal in
log-SNR (``log rho_{k,s} = log rho_k + (s/S)(log rho_{k+1} - log rho_k)``), so the fine nodes
are refined nodes and their states are read off one ``trajectory=True`` run of the ordinary
sampler -- no second integrator. Its accuracy is recorded as the Richardson estimate
``error_estimate = RMS(x0_fine - x0_coarse) / 15``, with ``x0_coarse`` the same solve on every
other refined node (half the substeps) for the first ``error_samples`` rows of ``x_T``: for a
fourth-order method the coarse error is about 16 times the fine one, so their difference is
about 15 times the fine error.

Teachers are cached as one ``.npz`` (written atomically) next to their settings: the solver,
the fine grid, the schedule, the working dtype, the caller's ``model_id`` (e.g. a hash of the
network parameters) and a sha256 of ``x_T`` (and, for a class-conditional network, of the
rows' class ``labels``). :func:`load_or_solve_teacher` reuses a file only when all of these
match, and recomputes (never crashes) on a torn or corrupt file.

**Class labels.** A class-conditional network's trajectory ``i`` is solved for its class
``labels[i]`` (every network call of the solve passes the rows' labels,
``deis_jax.sampling.wrappers.eps_of``); the teacher keeps them (``Teacher.labels``), so a
fitter reads each starting point's class with its ``x_T`` and indexes both alike.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from deis_jax.common.files import atomic_write_bytes
from deis_jax.common.identity import array_digest, describe_differences, describe_object
from deis_jax.sampling.sampler import SamplingPlan, make_plan, sample
from deis_jax.sampling.sde import NoiseSchedule
from deis_jax.sampling.timesteps import GRID_KINDS, check_grid_power, time_grid, validate_grid
from deis_jax.sampling.wrappers import EpsFn, eps_of, model_argument

TEACHER_FORMAT = 1
TEACHER_SOLVER = {"method": "rhork", "order": 4}
TEACHER_GRID_KINDS = tuple(k for k in GRID_KINDS if k != "custom")


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
    """Teacher trajectories on a fine grid (see the module docstring).

    ``ts``: (M,) float64, decreasing from t1 to t0: the fine grid, or the ``state_ts`` the
    states were kept at (``solve_teacher``). ``x_T``, ``x0``: (n, *shape).
    ``states``: (n, M, *shape) or None; ``eps``: (n, M-1, *shape) or None.
    ``settings``: JSON-able description of how the teacher was made (the cache key).
    ``error_estimate``: Richardson estimate of the RMS error of ``x0``.
    ``labels``: (n,) int32, the class of every trajectory (a class-conditional network), or
    None.
    """

    ts: np.ndarray
    x_T: np.ndarray
    x0: np.ndarray
    states: np.ndarray | None
    eps: np.ndarray | None
    settings: dict
    error_estimate: float
    labels: np.ndarray | None = None

    @property
    def num_points(self) -> int:
        """M, the number of fine grid points."""
        return int(self.ts.shape[0])

    @property
    def num_samples(self) -> int:
        """n, the number of trajectories."""
        return int(self.x_T.shape[0])


# --- settings -----------------------------------------------------------------------------


def working_dtype() -> np.dtype:
    """float64 when ``jax_enable_x64`` is on, else float32."""
    return np.dtype(np.float64 if jax.config.jax_enable_x64 else np.float32)


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")


def teacher_settings(
    schedule: NoiseSchedule,
    x_T,
    *,
    t0: float | None = None,
    t1: float | None = None,
    num_points: int = 61,
    grid: str = "log_snr",
    grid_power: float | None = None,
    substeps: int = 4,
    keep_states: bool = True,
    model_id: str = "",
    error_samples: int | None = 16,
    ts=None,
    state_ts=None,
    labels=None,
) -> dict[str, Any]:
    """The validated, JSON-normalised settings of a teacher (the cache key of
    :func:`load_or_solve_teacher`); the arguments are those of :func:`solve_teacher`.
    ``batch_size`` is not a setting: it does not change the result. ``labels`` enter as
    their sha256 (absent for an unconditional teacher, whose key is unchanged)."""
    _check_int("substeps", substeps, 1)
    _check_int("error_samples", error_samples, 1, allow_none=True)
    if ts is not None:  # an explicit fine grid (e.g. a refinement of a student's grid)
        ts = np.asarray(ts, np.float64)
        validate_grid(schedule, ts)
        num_points, grid, grid_power = int(ts.shape[0]), "custom", None
        t0, t1 = float(ts[-1]), float(ts[0])
    _check_int("num_points", num_points, 2)
    if grid not in TEACHER_GRID_KINDS + (("custom",) if ts is not None else ()):
        raise ValueError(f"grid must be one of {TEACHER_GRID_KINDS}, got {grid!r}")
    grid_power = None if ts is not None else check_grid_power(grid, grid_power)
    if not isinstance(model_id, str):
        raise ValueError(f"model_id must be a string, got {model_id!r}")
    shape = np.shape(x_T)
    if len(shape) < 2 or shape[0] < 1:
        raise ValueError(f"x_T must have shape (n, ...) with n >= 1, got {shape}")
    t0, t1 = schedule.interval(t0, t1)
    settings = {
        "format": TEACHER_FORMAT,
        "solver": dict(TEACHER_SOLVER),
        "num_points": int(num_points),
        "grid": grid,
        "grid_power": grid_power,
        "substeps": int(substeps),
        "t0": t0,
        "t1": t1,
        "schedule": describe_object(schedule),
        "dtype": working_dtype().name,
        "keep_states": bool(keep_states),
        "error_samples": error_samples,
        "model_id": model_id,
        "x_T_shape": list(shape),
        "x_T_sha256": array_digest(x_T),
    }
    if labels is not None:
        settings["labels_sha256"] = array_digest(check_labels(labels, shape[0]))
    if ts is not None:
        settings["ts"] = [float(t) for t in ts]
    if state_ts is not None:
        if not keep_states:
            raise ValueError("state_ts needs keep_states=True")
        settings["state_ts"] = [float(t) for t in np.asarray(state_ts, np.float64)]
    return json.loads(json.dumps(settings))


def check_labels(labels, n: int) -> np.ndarray:
    """``labels`` as int32 ``(n,)``: one class per starting point (``ValueError`` otherwise)."""
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be one int class per starting point, shape ({n},), got "
            f"{labels.dtype}{list(labels.shape)}"
        )
    return labels.astype(np.int32)


# --- the solve ------------------------------------------------------------------------------


def refine_grid(schedule: NoiseSchedule, ts: np.ndarray, substeps: int) -> np.ndarray:
    """Split every interval of the decreasing grid ``ts`` into ``substeps`` parts equal in
    log-SNR (equivalently in ``log rho``); ``refined[::substeps] == ts`` exactly."""
    ts = np.asarray(ts, np.float64)
    log_rho = np.log(np.asarray(schedule.rho(ts), np.float64))
    frac = np.arange(substeps) / substeps
    sub = log_rho[:-1, None] + frac[None, :] * np.diff(log_rho)[:, None]  # (M-1, S)
    refined = np.asarray(schedule.t_from_rho(np.exp(sub.ravel())), np.float64)
    refined = np.append(refined, ts[-1])
    refined[::substeps] = ts
    return refined


def halve_grid(ts: np.ndarray) -> np.ndarray:
    """Every other point of ``ts``, endpoints kept (the last step is a single one when the
    number of steps is odd)."""
    coarse = ts[::2]
    return coarse if coarse[-1] == ts[-1] else np.append(coarse, ts[-1])


@functools.lru_cache(maxsize=16)
def _cached_plan(schedule: NoiseSchedule, ts: tuple[float, ...]) -> SamplingPlan:
    return make_plan(schedule, np.array(ts, np.float64), **TEACHER_SOLVER)


def teacher_plan(schedule: NoiseSchedule, ts: np.ndarray) -> SamplingPlan:
    """The teacher's RK4 plan on ``ts``; the same object for the same (schedule, grid), so a
    repeated solve reuses the compiled loop (plans are static arguments, hashed by
    identity). An unhashable schedule gets a fresh plan."""
    try:
        hash(schedule)
    except TypeError:
        return make_plan(schedule, np.asarray(ts, np.float64), **TEACHER_SOLVER)
    return _cached_plan(schedule, tuple(float(t) for t in ts))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _solve_batch(plan: SamplingPlan, eps_fn, x_T, keep: tuple[int, ...] | None, with_eps: bool,
                 labels=None):  # fmt: skip
    """x0, and (unless ``keep`` is None) the states at the points ``keep`` of ``plan``'s grid
    and (``with_eps``) eps there (all but the last point), batch axis first; ``labels``: the
    rows' classes (a class-conditional network)."""
    if keep is None:
        return sample(plan, eps_fn, x_T, labels=labels), None, None
    x0, states = sample(plan, eps_fn, x_T, trajectory=True, labels=labels)
    fine = states[np.asarray(keep)]  # (M, B, ...)
    if not with_eps:
        return x0, jnp.moveaxis(fine, 0, 1), None
    ts = jnp.asarray(plan.ts[np.asarray(keep[:-1])], x_T.dtype)
    eps = jax.lax.map(lambda a: eps_of(eps_fn, a[0], a[1], labels), (fine[:-1], ts))
    return x0, jnp.moveaxis(fine, 0, 1), jnp.moveaxis(eps, 0, 1)


def _batched(fn, x: np.ndarray, batch_size: int | None, labels: np.ndarray | None = None) -> list:
    """Apply ``fn(x_chunk, labels_chunk)`` to ``x`` (and its rows' ``labels``, or None) in
    batches of ``batch_size`` rows (the last one padded by repeating its final row, so every
    call has one shape and compiles once), concatenating each output (``None`` outputs stay
    ``None``)."""
    n = x.shape[0]
    batch = n if batch_size is None else min(batch_size, n)

    def padded(a, start):
        chunk = a[start : start + batch]
        if chunk.shape[0] < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - chunk.shape[0], axis=0)])
        return jnp.asarray(chunk)

    parts = []
    for start in range(0, n, batch):
        size = min(batch, n - start)
        out = fn(padded(x, start), None if labels is None else padded(labels, start))
        parts.append([None if o is None else np.asarray(o)[:size] for o in out])
    return [None if p[0] is None else np.concatenate(p) for p in zip(*parts, strict=True)]


def solve_teacher(
    schedule: NoiseSchedule,
    eps_fn: EpsFn,
    x_T,
    *,
    t0: float | None = None,
    t1: float | None = None,
    num_points: int = 61,
    grid: str = "log_snr",
    grid_power: float | None = None,
    substeps: int = 4,
    keep_states: bool = True,
    model_id: str = "",
    batch_size: int | None = None,
    error_samples: int | None = 16,
    ts=None,
    state_ts=None,
    labels=None,
) -> Teacher:
    """Solve the probability-flow ODE from every row of ``x_T`` (shape (n, ...)) (for a
    class-conditional network, row ``i`` of class ``labels[i]``, int ``(n,)``).

    Fine grid: ``time_grid(schedule, num_points - 1, grid, power=grid_power, t0=t0, t1=t1)``,
    or the explicit decreasing grid ``ts`` (which then replaces ``num_points``, ``grid``,
    ``grid_power``, ``t0`` and ``t1``; e.g. :func:`refine_grid` of a student's grid, so that
    the teacher's states include the student's grid points exactly).
    Solver: RK4 in rho on that grid refined ``substeps`` times in log-SNR (the module
    docstring), i.e. ``4 * substeps * (num_points - 1)`` eps calls per sample, plus
    ``num_points - 1`` for the stored eps when ``keep_states``. Rows are processed
    ``batch_size`` at a time (default: all at once) in float64 under ``jax_enable_x64``, else
    float32. ``error_estimate`` uses the first ``error_samples`` rows (None: all).
    ``state_ts``: keep the states at these points of the fine grid only (and no eps), e.g. a
    student's grid inside a fine one (:func:`deis_jax.fitting.amed.amed_teacher`); the
    teacher's ``ts`` are then these points.
    """
    _check_int("batch_size", batch_size, 1, allow_none=True)
    settings = teacher_settings(
        schedule, x_T, t0=t0, t1=t1, num_points=num_points, grid=grid, grid_power=grid_power,
        substeps=substeps, keep_states=keep_states, model_id=model_id,
        error_samples=error_samples, ts=ts, state_ts=state_ts, labels=labels,
    )  # fmt: skip
    dtype = working_dtype()
    x_T = np.asarray(x_T, dtype)
    labels = None if labels is None else check_labels(labels, x_T.shape[0])
    if ts is None:
        ts = time_grid(schedule, num_points - 1, grid, power=grid_power, t0=t0, t1=t1)
    ts = np.asarray(ts, np.float64)
    refined = refine_grid(schedule, ts, substeps)
    plan = teacher_plan(schedule, refined)
    eps_arg = model_argument(eps_fn)
    keep = tuple(range(0, refined.size, substeps)) if keep_states else None
    if state_ts is not None:
        position = {float(t): i for i, t in enumerate(ts)}
        missing = [float(t) for t in state_ts if float(t) not in position]
        if missing:
            raise ValueError(f"state_ts must be points of the fine grid; {missing[:4]} are not")
        keep = tuple(substeps * position[float(t)] for t in state_ts)
        ts = np.asarray(state_ts, np.float64)

    num_check = x_T.shape[0] if error_samples is None else min(error_samples, x_T.shape[0])
    coarse_plan = teacher_plan(schedule, halve_grid(refined))
    # full float32 matmuls (GPUs default to TF32 for them); the same numbers on a CPU
    with jax.default_matmul_precision("highest"):
        x0, states, eps = _batched(
            lambda x, c: _solve_batch(plan, eps_arg, x, keep, state_ts is None, c), x_T,
            batch_size, labels,
        )  # fmt: skip
        (coarse,) = _batched(
            lambda x, c: (_solve_batch(coarse_plan, eps_arg, x, None, False, c)[0],),
            x_T[:num_check], batch_size, None if labels is None else labels[:num_check],
        )  # fmt: skip
    diff = np.asarray(x0[:num_check], np.float64) - np.asarray(coarse, np.float64)
    error_estimate = float(np.sqrt(np.mean(diff**2)) / 15.0)
    return Teacher(ts, x_T, x0, states, eps, settings, error_estimate, labels)


# --- the cache ------------------------------------------------------------------------------


def save_teacher(path: str, teacher: Teacher) -> None:
    """Write ``teacher`` to ``path`` as one ``.npz`` (settings as a JSON string), atomically."""
    arrays = {
        "ts": np.asarray(teacher.ts, np.float64),
        "x_T": teacher.x_T,
        "x0": teacher.x0,
        "settings": np.array(json.dumps(teacher.settings, sort_keys=True)),
        "error_estimate": np.float64(teacher.error_estimate),
    }
    if teacher.states is not None:
        arrays["states"] = teacher.states
    if teacher.eps is not None:
        arrays["eps"] = teacher.eps
    if teacher.labels is not None:
        arrays["labels"] = np.asarray(teacher.labels, np.int32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_teacher(path: str, *, states: bool = True) -> Teacher:
    """Read a teacher written by :func:`save_teacher` (``states=False`` skips reading the
    states and eps). A file whose arrays do not fit together raises ``ValueError``."""
    with np.load(path, allow_pickle=False) as data:
        ts, x_T, x0 = data["ts"], data["x_T"], data["x0"]
        settings = json.loads(str(data["settings"]))
        error_estimate = float(data["error_estimate"])
        st = data["states"] if states and "states" in data.files else None
        eps = data["eps"] if states and "eps" in data.files else None
        labels = data["labels"] if "labels" in data.files else None
    n, m = x_T.shape[0], ts.shape[0]
    ok = ts.ndim == 1 and x0.shape == x_T.shape and isinstance(settings, dict)
    ok = ok and (st is None or st.shape == (n, m) + x_T.shape[1:])
    ok = ok and (eps is None or eps.shape == (n, m - 1) + x_T.shape[1:])
    ok = ok and (labels is None or labels.shape == (n,))
    ok = ok and (labels is None) == ("labels_sha256" not in settings)
    if not ok:
        raise ValueError(f"teacher file {path} is inconsistent (array shapes do not match)")
    return Teacher(ts, x_T, x0, st, eps, settings, error_estimate, labels)


def load_or_solve_teacher(
    path: str,
    schedule: NoiseSchedule,
    eps_fn: EpsFn,
    x_T,
    *,
    model_id: str,
    **settings,
) -> Teacher:
    """The teacher cached at ``path`` when it was made with the same settings (those of
    :func:`solve_teacher`, passed as keywords), ``model_id`` and ``x_T`` (and ``labels``:
    a teacher of other classes is solved again); otherwise solve it and overwrite the file.
    A missing, torn or corrupt file is recomputed (with a warning for the latter two), never
    an error."""
    batch_size = settings.pop("batch_size", None)
    requested = teacher_settings(schedule, x_T, model_id=model_id, **settings)
    try:
        cached = load_teacher(path, states=requested["keep_states"])
    except FileNotFoundError:
        logging.info("teacher cache %s: no file; solving", path)
    except Exception as err:  # a damaged .npz fails in zipfile, numpy's header parser, ...
        logging.warning("teacher cache %s is unreadable (%s: %s); recomputing",
                        path, type(err).__name__, err)  # fmt: skip
    else:
        # a cached teacher with states also serves a request without them
        served = {**requested, "keep_states": cached.settings.get("keep_states")}
        if requested["keep_states"] or not cached.settings.get("keep_states"):
            served = requested
        diffs = describe_differences(cached.settings, served, labels=("cached", "requested"))
        if not diffs:
            logging.info("teacher cache %s: reusing", path)
            if cached.settings["keep_states"] != requested["keep_states"]:
                cached = dataclasses.replace(cached, settings=requested)
            return cached
        for diff in diffs:
            logging.info("teacher cache %s: %s; recomputing", path, diff)
    teacher = solve_teacher(schedule, eps_fn, x_T, model_id=model_id, batch_size=batch_size,
                            **settings)  # fmt: skip
    save_teacher(path, teacher)
    return teacher
