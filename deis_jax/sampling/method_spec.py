"""Compact method specs used by configs, tables and sweeps: ``name[order][:key=value,...]``.

Examples: ``ddim``, ``tab3``, ``rhoab2``, ``rhork:tableau=kutta3``, ``ipndm3``,
``sddim:lam=1.0``, ``dpm2:afs=true`` (a method whose name ends in digits is that method, not
an order). The order defaults to the method's default order.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from deis_jax.sampling import solvers

_SPEC = re.compile(r"^(?P<name>[a-z_]*[a-z_])(?P<order>\d+)?(?::(?P<options>.*))?$")


class MethodChoice(NamedTuple):
    method: str
    order: int
    options: dict[str, Any]

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``tAB3``, ``rhoRK-kutta3``."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        spec = solvers.get_method(self.method)
        # A Runge-Kutta tableau fixes the order itself, so the label omits it.
        fixed = len(spec.orders) == 1 or "tableau" in self.options
        base = self.method if fixed else f"{self.method}{self.order}"
        return f"{base}:{opts}" if opts else base


def parse_option_value(text: str) -> Any:
    """An option value as written in a spec or on the command line: int, float,
    true/false (any case), else the string itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_method_spec(text: str) -> MethodChoice:
    """Parse ``text`` and check it with the method's spec (``MethodSpec.check``).

    A bad spec raises ``ValueError`` naming what is wrong and what is allowed.
    """
    match = _SPEC.match(text.strip())
    if match is None:
        raise ValueError(f"method spec {text!r} is not of the form name[order][:key=value,...]")
    name, order_text = match["name"], match["order"]
    if order_text is not None and name + order_text in solvers.method_names():
        name, order_text = name + order_text, None  # a name ending in digits, e.g. dpm2
    spec = solvers.get_method(name)
    options: dict[str, Any] = {}
    if match["options"]:
        for item in match["options"].split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"option {item!r} in method spec {text!r} is not key=value")
            options[key] = parse_option_value(value)
    order = None if order_text is None else int(order_text)
    try:
        order = spec.check(order, options)
    except solvers.MethodArgumentError as err:
        raise ValueError(f"{err.field} in method spec {text!r} {err.problem}") from None
    return MethodChoice(spec.name, order, options)
