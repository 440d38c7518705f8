"""A fitted sampler in one JSON file: the grid, the table corrections, what it was fitted for.

    grid = OptimizedGrid.load("grids/tab3_nfe5.json")
    grid.check_compatible(schedule, method="tab", order=3, nfe=5)   # ValueError naming diffs
    sampler = Sampler(grid.plan(schedule), eps_fn)                 # or ts=grid.ts anywhere

A file holds ``ts`` (float64, decreasing, written with ``repr`` precision so it round-trips
exactly), the sampling settings it is valid for (method, order, options, NFE, schedule,
interval), the optional learned table corrections (``deis_jax.sampling.learned``), and its
provenance (objective, model, teacher, losses, fit settings), and the ``sha256`` of all of it
(``deis_jax.fitting.fitted_file.FittedFile``): a file damaged or edited after it was written
is refused by :meth:`OptimizedGrid.load` (a file without the entry, written by hand or by an older
deis_jax, is read unchecked). A grid fitted for one setting
is refused for any other: the grid of a 5-NFE tAB-3 sampler is not a good 6-NFE iPNDM grid,
and a file used where it does not belong would silently give a worse sampler.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from deis_jax.common.identity import describe_object
from deis_jax.fitting.fitted_file import FittedFile
from deis_jax.sampling.learned import corrected_table
from deis_jax.sampling.sampler import SamplingPlan, make_plan
from deis_jax.sampling.sde import NoiseSchedule

OPTIMIZED_GRID = "optimized"  # the config's grid kind for a fitted grid file
OBJECTIVES = ("gits", "ld3", "fixed")  # fixed: a grid kind recorded as it is (no fit)


@dataclasses.dataclass(frozen=True, eq=False)
class OptimizedGrid(FittedFile):
    """A fitted grid (and optionally a learned table) with what it was fitted for."""

    FORMAT = "deis_jax.OptimizedGrid"
    FORMAT_VERSION = 1
    KIND = "grid file"
    REMEDY = (
        'fit it again with --mode=fit, or delete its "sha256" entry to use a file edited on purpose'
    )
    JSON_INDENT = 1

    ts: np.ndarray
    method: str
    order: int
    nfe: int
    options: dict
    schedule: dict  # describe_object(...): class and fields
    objective: str
    corrections: np.ndarray | None = None
    max_delta: float | None = None
    provenance: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        ts = np.asarray(self.ts, np.float64)
        if ts.ndim != 1 or ts.size < 2 or not np.all(np.isfinite(ts)) or np.any(np.diff(ts) >= 0):
            raise ValueError(f"OptimizedGrid.ts must be a finite decreasing 1-D grid, got {ts}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        object.__setattr__(self, "ts", ts)
        if self.corrections is not None:
            if self.max_delta is None:
                raise ValueError("OptimizedGrid with corrections needs max_delta")
            object.__setattr__(self, "corrections", np.asarray(self.corrections, np.float64))

    @property
    def t0(self) -> float:
        return float(self.ts[-1])

    @property
    def t1(self) -> float:
        return float(self.ts[0])

    @property
    def learned_table(self) -> bool:
        return self.corrections is not None

    def settings(self) -> dict[str, Any]:
        """The sampling settings this grid is valid for (compared by ``check_compatible``)."""
        return {
            "method": self.method,
            "order": self.order,
            "nfe": self.nfe,
            "options": dict(self.options),
            "schedule": self.schedule,
            "t0": self.t0,
            "t1": self.t1,
        }

    def check_compatible(
        self,
        schedule: NoiseSchedule,
        *,
        method: str,
        order: int,
        nfe: int,
        options: dict | None = None,
        t0: float | None = None,
        t1: float | None = None,
    ) -> None:
        """Raise ``ValueError`` listing every setting that differs from the fitted ones.

        ``t0``/``t1`` None means the schedule's defaults (``schedule.interval``)."""
        t0, t1 = schedule.interval(t0, t1)
        wanted = {
            "method": method,
            "order": order,
            "nfe": nfe,
            "options": dict(options or {}),
            "schedule": describe_object(schedule),
            "t0": t0,
            "t1": t1,
        }
        self.refuse_other(wanted)

    def plan(self, schedule: NoiseSchedule) -> SamplingPlan:
        """The sampling plan: the method on ``ts``, with the learned corrections if any."""
        if describe_object(schedule) != self.schedule:
            raise ValueError(
                f"the grid file was fitted for schedule {self.schedule}, not {schedule}"
            )
        plan = make_plan(schedule, self.ts, method=self.method, order=self.order, **self.options)
        if plan.nfe != self.nfe:
            raise ValueError(f"the grid file's grid gives {plan.nfe} NFE, not its nfe={self.nfe}")
        if self.corrections is None:
            return plan
        table = corrected_table(plan.table, self.corrections, self.max_delta)
        return dataclasses.replace(plan, table=table)

    # --- the file (deis_jax.fitting.fitted_file) -----------------------------------------
    def fields(self) -> dict[str, Any]:
        return {
            "ts": [float(t) for t in self.ts],
            "method": self.method,
            "order": self.order,
            "nfe": self.nfe,
            "options": self.options,
            "schedule": self.schedule,
            "objective": self.objective,
            "corrections": None if self.corrections is None else self.corrections.tolist(),
            "max_delta": self.max_delta,
            "provenance": self.provenance,
        }

    @classmethod
    def from_fields(cls, record: dict[str, Any]) -> OptimizedGrid:
        return cls(
            ts=np.asarray(record["ts"], np.float64),
            method=record["method"],
            order=int(record["order"]),
            nfe=int(record["nfe"]),
            options=dict(record["options"]),
            schedule=dict(record["schedule"]),
            objective=record["objective"],
            corrections=record["corrections"],
            max_delta=record["max_delta"],
            provenance=dict(record["provenance"]),
        )
