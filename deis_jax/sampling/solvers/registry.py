"""Registry of sampling methods: name -> how to build its step table from a grid.

A method is registered once with its allowed orders, the NFE it spends per step, whether it
draws noise, and the extra keyword options it accepts. ``get_sampler`` and the config
validation both read this registry, so a new method is available everywhere by registering it
(see "Adding a sampler" in the README).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from deis_jax.sampling.solvers.table import StepTable

BuildFn = Callable[..., StepTable]  # build(schedule, ts, order, **options) -> StepTable


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    build: BuildFn
    orders: tuple[int, ...]
    default_order: int
    description: str
    stages: Callable[[int, dict[str, Any]], int] = lambda order, options: 1
    stochastic: bool = False
    default_grid: str = "quadratic"
    options: tuple[str, ...] = ()
    min_nfe: Callable[[int, dict[str, Any]], int] | None = None

    def nfe_per_step(self, order: int, options: dict[str, Any]) -> int:
        return self.stages(order, options)

    def minimum_nfe(self, order: int, options: dict[str, Any]) -> int:
        """Smallest NFE budget accepted (default 1: a budget rounds up to whole steps)."""
        return 1 if self.min_nfe is None else self.min_nfe(order, options)


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    if spec.default_order not in spec.orders:
        raise ValueError(f"default order of {spec.name!r} is not among its orders")
    _REGISTRY[spec.name] = spec
    return spec


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return _REGISTRY[name]
