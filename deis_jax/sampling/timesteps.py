"""Time grids ``t_1 = T > ... > t_N = t0`` (N steps, N + 1 points), built in float64.

Kinds (``kind`` argument / ``config.sampler.grid``):

``time``      ``t_k = (T^(1/p) + k/N (t0^(1/p) - T^(1/p)))^p``  -- power p (default 1);
``linear``    ``time`` with p = 1;
``quadratic`` ``time`` with p = 2 (the DEIS default);
``rho``       the same power law in ``rho = sigma/alpha`` (Karras et al.; default p = 7),
              then ``t_k = t(rho_k)``;
``karras``    ``rho`` with p = 7 (on ``EDMSchedule``, where rho = t = sigma, exactly EDM's
              sigma grid);

Only ``time`` and ``rho`` take a ``power`` (``config.sampler.grid_power``); the named kinds fix
theirs, and giving one anyway is an error rather than silently ignored.
``log_snr``   uniform in log-SNR (equivalently in log rho), the DPM-Solver default;
``custom``    an explicit array (``custom=``), validated.

Discrete schedules get integer grids (``integer=True`` by default there): the float grid is
rounded to the nearest integer, duplicates are dropped and the gaps are refilled with the
smallest unused integers, so there are always N + 1 distinct points (DEIS refills the same way
but truncates instead of rounding, which makes its grid depend on float precision).

Every grid is validated: finite, strictly decreasing, exact endpoints, inside the schedule's
valid interval (``NoiseSchedule.check_interval``).
"""

from __future__ import annotations

import numbers

import numpy as np

from deis_jax.sampling.sde import NoiseSchedule, check_schedule

GRID_KINDS = ("time", "linear", "quadratic", "rho", "karras", "log_snr", "custom")
DEFAULT_POWER = {"time": 1.0, "linear": 1.0, "quadratic": 2.0, "rho": 7.0, "karras": 7.0}
POWER_KINDS = ("time", "rho")  # the kinds whose power is free
_FIXED_POWER_OF = {"linear": "time", "quadratic": "time", "karras": "rho"}


def check_grid_power(kind: str, power: float | None) -> float | None:
    """The power grid ``kind`` uses: ``power`` (> 0) for ``time`` and ``rho``, the kind's own
    for the others. A power given for another kind raises ``ValueError`` (it would be ignored).
    """
    if power is None:
        return DEFAULT_POWER.get(kind)
    if kind not in POWER_KINDS:
        fixed = _FIXED_POWER_OF.get(kind)
        what = (
            f"{kind!r} is {fixed!r} with power {DEFAULT_POWER[kind]:g}"
            if fixed
            else f"{kind!r} has no power"
        )
        raise ValueError(f"grid_power applies to the grid kinds {POWER_KINDS}; {what}")
    if isinstance(power, bool) or not isinstance(power, numbers.Real) or not power > 0:
        raise ValueError(f"grid_power must be > 0, got {power!r}")
    return power


def _power_interp(a: float, b: float, num_steps: int, power: float) -> np.ndarray:
    """N + 1 points from a to b, uniform in ``x^(1/power)``."""
    frac = np.linspace(0.0, 1.0, num_steps + 1)
    lo, hi = a ** (1.0 / power), b ** (1.0 / power)
    return (lo + frac * (hi - lo)) ** power


def time_grid(
    schedule: NoiseSchedule,
    num_steps: int | None = None,
    kind: str = "quadratic",
    *,
    power: float | None = None,
    t0: float | None = None,
    t1: float | None = None,
    custom=None,
    integer: bool | None = None,
) -> np.ndarray:
    """Build and validate a decreasing float64 grid of ``num_steps + 1`` times.

    ``power`` applies to the kinds ``time`` and ``rho`` (see :func:`check_grid_power`);
    ``[t0, t1]`` defaults to the schedule's interval (``NoiseSchedule.interval``).
    """
    check_schedule(schedule)
    if kind not in GRID_KINDS:
        raise ValueError(f"grid kind must be one of {GRID_KINDS}, got {kind!r}")
    power = check_grid_power(kind, power)
    if kind == "custom":
        if custom is None:
            raise ValueError("grid kind 'custom' needs the `custom` array of times")
        validate_grid(schedule, custom)
        return np.asarray(custom, dtype=np.float64)
    if num_steps is None or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    num_steps = int(num_steps)
    t0, t1 = schedule.interval(t0, t1)
    integer = schedule.is_discrete if integer is None else integer

    if kind in ("time", "linear", "quadratic"):
        ts = _power_interp(t1, t0, num_steps, power)
    elif kind in ("rho", "karras"):
        rhos = _power_interp(float(schedule.rho(t1)), float(schedule.rho(t0)), num_steps, power)
        ts = schedule.t_from_rho(rhos)
    else:  # log_snr
        log_rhos = np.linspace(np.log(schedule.rho(t1)), np.log(schedule.rho(t0)), num_steps + 1)
        ts = schedule.t_from_rho(np.exp(log_rhos))
    ts = np.asarray(ts, dtype=np.float64)
    ts[0], ts[-1] = t1, t0  # exact endpoints despite round trips through rho
    if integer:
        ts = integer_grid(ts, t0, t1)
    validate_grid(schedule, ts)
    return ts


def integer_grid(ts: np.ndarray, t0: float, t1: float) -> np.ndarray:
    """Round to integers, drop duplicates, refill with the smallest unused integers."""
    lo, hi = int(round(t0)), int(round(t1))
    if hi - lo + 1 < ts.size:
        raise ValueError(
            f"an integer grid of {ts.size} points does not fit in [{lo}, {hi}]: "
            f"use at most {hi - lo} steps"
        )
    points = list(dict.fromkeys(int(v) for v in np.rint(ts)))
    used = set(points)
    candidate = lo + 1
    while len(points) < ts.size:
        while candidate in used:
            candidate += 1
        points.append(candidate)
        used.add(candidate)
    return np.array(sorted(points, reverse=True), dtype=np.float64)


def validate_grid(schedule: NoiseSchedule, ts: np.ndarray) -> None:
    """A 1-D array of at least two times, finite, strictly decreasing, inside the schedule's
    valid interval (``NoiseSchedule.check_interval`` of its ends ``t0 = ts[-1]``,
    ``t1 = ts[0]``)."""
    try:
        ts = np.asarray(ts, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"time grid ts must be a 1-D array of times, got {ts!r} ({err})") from None
    if ts.ndim != 1 or ts.size < 2:
        raise ValueError(
            f"time grid ts must be a 1-D array of at least 2 times (t1 > ... > t0), got shape "
            f"{ts.shape}"
        )
    if not np.all(np.isfinite(ts)):
        raise ValueError("time grid contains non-finite values")
    if not np.all(np.diff(ts) < 0):
        raise ValueError("time grid must be strictly decreasing (from t1 down to t0)")
    try:
        schedule.check_interval(float(ts[-1]), float(ts[0]))
    except ValueError as err:
        ends = f"t1 = ts[0] = {ts[0]:g}, t0 = ts[-1] = {ts[-1]:g}"
        raise ValueError(f"time grid ({ends}): {err}") from None
