"""Registry of sampling methods: name -> how to build its step table from a grid.

A method is registered once with its allowed orders, the NFE it spends per step, its default
grid and the extra keyword options it accepts. The spec is the one place where a method's
arguments are checked (:meth:`MethodSpec.check`, :meth:`MethodSpec.check_nfe`): ``get_sampler``,
the method-spec strings (``deis_jax.sampling.method_spec``) and the config validation all call
it, so a new method is available and validated everywhere by registering it (see "Adding a
sampler" in the README).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from deis_jax.sampling.solvers.table import StepTable

# The largest NFE budget a sampler accepts: building a plan is linear in the NFE (a few
# hundred milliseconds at this size), and beyond it a budget is a typo or a reference solve,
# which should pass its own explicit grid ``ts``.
MAX_NFE = 10_000

# How a budget that a multi-stage method cannot spend exactly is treated (``make_plan``).
NFE_ROUNDINGS = ("exact", "up")

# Options every method accepts; ``make_plan`` takes them as its own keywords (not passed to
# the builder): ``afs`` -- the analytical first step (``sampling.sampler.make_plan``).
GENERIC_OPTIONS = ("afs",)

BuildFn = Callable[..., StepTable]  # build(schedule, ts, order, **options) -> StepTable
# options_check(options, final_denoise) raises MethodArgumentError for a bad combination.
OptionsCheck = Callable[[Mapping[str, Any], bool], None]


class MethodArgumentError(ValueError):
    """A bad argument of a sampling method.

    ``field`` names the argument (``order``, ``nfe``, ``options`` or ``options.<key>``) and
    ``problem`` says what is wrong and what is allowed; the message is ``"<field> <problem>"``.
    Callers that know where the argument came from re-prefix the field (config validation
    reports ``config.sampler.<field> <problem>``).
    """

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def as_integer(value: Any) -> int | None:
    """``value`` as a Python ``int`` if it is an integer -- an ``int``, a numpy integer or a
    float with an integral value (``2.0``) -- else None. A ``bool`` is never an integer here
    (``True == 1`` would otherwise pass as order 1)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return int(value) if math.isfinite(value) and float(value).is_integer() else None


def _one_stage(order: int, options: Mapping[str, Any]) -> int:
    return 1


def two_per_step(order: int, options: Mapping[str, Any]) -> int:
    """A ``stages`` / ``rounds`` count of 2 per step whatever the order and options
    (AMED's two stages, the probe methods' two rounds)."""
    return 2


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A sampling method: ``build(schedule, ts, order, **options) -> StepTable`` and what it
    accepts -- ``orders`` (``default_order`` when none is given), ``options`` (keyword names),
    ``stages(order, options)`` (NFE per step), ``default_grid`` (a ``GRID_KINDS`` entry) and
    an optional ``options_check`` for combinations the names alone do not rule out.
    ``rule(schedule, ts, order, **options)``, for methods whose coefficients are computed on
    the device from learned parameters, builds their ``StepRule`` (``sampling.sampler``)."""

    name: str
    build: BuildFn
    orders: tuple[int, ...]
    default_order: int
    stages: Callable[[int, Mapping[str, Any]], int] = _one_stage
    default_grid: str = "quadratic"
    options: tuple[str, ...] = ()
    options_check: OptionsCheck | None = None
    rule: Callable[..., Any] | None = None
    rounds: Callable[[int, Mapping[str, Any]], int] | None = None

    def nfe_per_step(
        self, order: int, options: Mapping[str, Any], *, parallel: bool = False
    ) -> int:
        """Network evaluations per step for ``order`` and ``options``; ``parallel=True``: the
        sequential rounds of network calls per step (``rounds``; the stages unless some are
        evaluated together, as EPD's probes)."""
        if parallel and self.rounds is not None:
            return self.rounds(order, options)
        return self.stages(order, options)

    def check(
        self,
        order: int | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        final_denoise: bool = False,
    ) -> int:
        """Check ``order`` and the option names (and the ``options_check`` hook, which also
        sees ``final_denoise``); return the order, ``default_order`` when None.

        The order may be any integer (:func:`as_integer`: ``2`` or ``2.0``, never ``True``).
        Raises ``MethodArgumentError`` (a ``ValueError``) naming the field and what is allowed.
        """
        given = self.default_order if order is None else order
        order = as_integer(given)
        if order not in self.orders:
            raise MethodArgumentError(
                "order",
                f"must be one of {self.orders} for method {self.name!r}, got {given!r}"
                + ("" if type(given) is int else f" (a {type(given).__name__})"),
            )
        options = {} if options is None else options
        unknown = sorted(set(options) - set(self.options) - set(GENERIC_OPTIONS))
        if unknown:
            raise MethodArgumentError(
                "options",
                f"has unknown key(s) {unknown} for method {self.name!r}; allowed: "
                f"{self.options + GENERIC_OPTIONS}",
            )
        if "afs" in options and not isinstance(options["afs"], bool):
            raise MethodArgumentError(
                "options.afs", f"must be True or False, got {options['afs']!r}"
            )
        own = {k: v for k, v in options.items() if k not in GENERIC_OPTIONS}
        if self.options_check is not None:
            self.options_check(own, final_denoise)
        return order

    def check_nfe(self, nfe: Any, order: int) -> int:
        """Check an NFE budget: an integer (:func:`as_integer`) in ``[1, MAX_NFE]`` (a budget
        rounds up to whole steps, so every one in range is accepted); return it as an
        ``int``. O(1): nothing is built."""
        value = as_integer(nfe)
        if value is None or value < 1:
            raise MethodArgumentError(
                "nfe",
                f"must be an integer >= 1, got {nfe!r} (method {self.name!r}, order {order})",
            )
        if value > MAX_NFE:
            raise MethodArgumentError(
                "nfe",
                f"must be <= {MAX_NFE}, got {nfe!r} (method {self.name!r}): beyond that a "
                "budget is a reference solve; pass its explicit grid ts instead",
            )
        return value

    def budget(
        self, order: int, options: Mapping[str, Any], *, afs: bool = False,
        final_denoise: bool = False, parallel: bool = False,
    ) -> tuple[int, int]:  # fmt: skip
        """``(per_step, offset)``: N steps spend ``per_step * N + offset`` NFE (AFS saves the
        first network call, ``offset -1``; the final denoising step costs one, ``+1``);
        ``parallel=True`` counts sequential rounds (``parallel_nfe``) instead."""
        per_step = self.nfe_per_step(order, options, parallel=parallel)
        return per_step, int(final_denoise) - int(afs)

    def num_steps(
        self, nfe: int, order: int, options: Mapping[str, Any], *, afs: bool = False,
        final_denoise: bool = False, rounding: str = "exact", parallel: bool = False,
    ) -> int:  # fmt: skip
        """The number of steps that spend the budget ``nfe`` (checked by :meth:`check_nfe`).

        ``rounding="exact"``: a budget this method cannot spend is refused, naming the
        budgets it can (``MethodArgumentError`` for ``nfe``); ``"up"``: the fewest steps
        spending at least ``nfe`` (the DEIS paper's tables, whose Runge-Kutta rows spend
        ``s * ceil(NFE / s)``; the plan's ``nfe`` says what it spends). ``parallel=True``:
        ``nfe`` is a ``parallel_nfe`` budget, sequential rounds of network calls (errors
        name ``parallel_nfe``).
        """
        if rounding not in NFE_ROUNDINGS:
            raise MethodArgumentError(
                "nfe_rounding", f"must be one of {NFE_ROUNDINGS}, got {rounding!r}"
            )
        per_step, offset = self.budget(order, options, afs=afs, final_denoise=final_denoise,
                                       parallel=parallel)  # fmt: skip
        steps = max(1, math.ceil((nfe - offset) / per_step))
        if per_step * steps + offset < 1:  # e.g. one AFS step of a one-stage method: 0 NFE
            steps += 1
        if rounding == "exact" and per_step * steps + offset != nfe:
            problem = self._budget_problem(nfe, order, options, per_step, offset, afs,
                                           final_denoise, parallel)  # fmt: skip
            raise MethodArgumentError("parallel_nfe" if parallel else "nfe", problem)
        return steps

    def _budget_problem(self, nfe: int, order: int, options: Mapping[str, Any], per_step: int,
                        offset: int, afs: bool, final_denoise: bool,
                        parallel: bool) -> str:  # fmt: skip
        """Why ``nfe`` cannot be spent: the budgets that can, and the nearest two."""
        spendable = [per_step * n + offset for n in range(1, 64)]
        spendable = [b for b in spendable if b >= 1]
        lower = [b for b in spendable if b < nfe]
        nearest = ([lower[-1]] if lower else []) + [min(b for b in spendable if b > nfe)]
        how = [f"{per_step} per step"]
        if afs:
            how.append("1 less in all with AFS")
        if final_denoise:
            how.append("1 more for the final denoising step")
        kind = ""
        if per_step == 2:
            kind = "odd " if spendable[0] % 2 else "even "
        with_ = [w for w, on in (("afs", afs), ("final_denoise", final_denoise)) if on]
        name = self.name + (f" order {order}" if len(self.orders) > 1 else "")
        if per_step != self.nfe_per_step(order, {}, parallel=parallel):  # options set the cost
            # (rhork's tableau, EPD's probes): name them, not the order
            name = self.name + " " + ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
        name += f" with {' and '.join(with_)}" if with_ else ""
        other = ""
        if per_step == 2 and not final_denoise:
            other = f"; with afs={not afs} it spends {'even' if afs else 'odd'} NFE"
        return (
            f"must be a budget that {name} spends exactly ({', '.join(how)}): {kind}NFE "
            f"{', '.join(map(str, spendable[:4]))}, ...; got {nfe} (nearest: "
            f"{' or '.join(map(str, nearest))}{other})"
        )


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (a name is registered once); returns it."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    if spec.default_order not in spec.orders:
        raise ValueError(f"default order of {spec.name!r} is not among its orders")
    _REGISTRY[spec.name] = spec
    return spec


def method_names() -> tuple[str, ...]:
    """Names of the registered methods, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The registered spec called ``name`` (``ValueError`` naming the allowed methods)."""
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return _REGISTRY[name]
