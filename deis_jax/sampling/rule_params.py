"""Learned rule parameters that carry what they were trained for.

A method with a device-side rule (AMED's predictor, ``sampling.sampler.StepRule``) runs with
learned parameters. Parameters trained for one plan and given to another either crash deep
inside the network library (a predictor trained at NFE 5 on an NFE-7 plan) or, worse, run
silently with the wrong rule (an AMED-Plugin predictor on an AMED-Solver plan of the same
NFE). So :func:`deis_jax.sampling.sampler.sample` takes them only as :class:`RuleParams`:
the parameter tree plus the settings of the plan they were trained for (its
:func:`plan_signature`), and refuses a plan with other settings, naming each one.

``RuleParams`` is a pytree whose only leaves are the parameters; the signature is static
(auxiliary data), so it passes through ``jax.jit``, ``device_put`` and sharding unchanged and
the check runs once, when the sampler is traced.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from deis_jax.common.identity import describe_object, settings_differences


def signature(
    *,
    method: str,
    order: int,
    nfe: int,
    afs: bool,
    options: dict[str, Any],
    schedule: dict[str, Any],
    ts,
) -> dict[str, Any]:
    """The settings learned parameters depend on, as a JSON-normalised dict: the method, its
    order, NFE and AFS, its options (with the rule's defaults filled in), the schedule's
    description (``identity.describe_object``) and the grid."""
    record = {
        "method": method,
        "order": int(order),
        "nfe": int(nfe),
        "afs": bool(afs),
        "options": dict(options),
        "schedule": schedule,
        "ts": [float(t) for t in np.asarray(ts, np.float64)],
    }
    return json.loads(json.dumps(record, sort_keys=True))


def plan_signature(plan) -> dict[str, Any]:
    """:func:`signature` of a ``SamplingPlan`` with a rule (the rule's resolved options)."""
    if plan.rule is None:
        raise ValueError(f"method {plan.method!r} has no learned rule")
    return signature(method=plan.method, order=plan.order, nfe=plan.nfe, afs=plan.afs,
                     options=plan.rule.options, schedule=describe_object(plan.schedule),
                     ts=plan.ts)  # fmt: skip


@jax.tree_util.register_pytree_node_class
class RuleParams:
    """A rule's learned parameters (``params``, any pytree) and the :func:`signature` of the
    plan they were trained for (``trained_for``, a dict; stored as canonical JSON so that it
    is hashable, static under ``jit``).

    Made by the fitting code (``fit_amed(...).params``, ``AmedPredictorFile.rule_params()``);
    for parameters built by hand, ``RuleParams.for_plan(plan, params)`` states the plan.
    """

    def __init__(self, params: Any, trained_for: dict[str, Any] | str):
        self.params = params
        self._key = trained_for if isinstance(trained_for, str) else json.dumps(
            trained_for, sort_keys=True)  # fmt: skip

    @classmethod
    def for_plan(cls, plan, params: Any) -> RuleParams:
        """``params`` declared as trained for ``plan``."""
        return cls(params, plan_signature(plan))

    @property
    def trained_for(self) -> dict[str, Any]:
        return json.loads(self._key)

    def check(self, plan) -> None:
        """Raise ``ValueError`` naming every setting of ``plan`` that differs from the ones
        these parameters were trained for."""
        diffs = settings_differences(self.trained_for, plan_signature(plan), verb="trained")
        if diffs:
            raise ValueError("rule_params were trained for another plan: " + "; ".join(diffs))

    def tree_flatten(self):
        return (self.params,), self._key

    @classmethod
    def tree_unflatten(cls, key: str, children) -> RuleParams:
        return cls(children[0], key)

    def __repr__(self) -> str:
        t = self.trained_for
        return f"RuleParams({t['method']}, order={t['order']}, nfe={t['nfe']}, afs={t['afs']})"


def checked_rule_params(plan, rule_params) -> Any:
    """The parameter tree of ``rule_params`` after checking them against ``plan`` (None stays
    None): ``ValueError`` when the plan has no rule, when the parameters are a bare tree (they
    must say what they were trained for) or were trained for other settings."""
    if rule_params is None:
        return None
    if plan.rule is None:
        raise ValueError(f"rule_params given, but method {plan.method!r} has no learned rule")
    if not isinstance(rule_params, RuleParams):
        raise TypeError(
            f"rule_params must be a RuleParams (what fit_amed(...).params and "
            f"AmedPredictorFile.rule_params() return: parameters with the settings they were "
            f"trained for), got a bare {type(rule_params).__name__}; for parameters made by "
            f"hand use RuleParams.for_plan(plan, params)"
        )
    rule_params.check(plan)
    return rule_params.params
