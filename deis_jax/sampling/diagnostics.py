"""Non-finite samples: which rows came back NaN/Inf and, on request, at which step.

    bad = nonfinite_samples(x0)                       # cheap: once per batch, at the end
    if bad.size:
        steps = first_nonfinite_step(plan, eps_fn, x_T[bad])   # optional: rerun those rows
        raise NonFiniteSamplesError(bad, steps)

The sampling loop itself is never slowed down: :func:`nonfinite_samples` looks at the final
samples only, and :func:`first_nonfinite_step` reruns the *same* plan through the one generic
loop (``sampling.sampler.sample``) with a per-sample finite flag recorded after each step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.sampling.sampler import SamplingPlan, sample
from deis_jax.sampling.wrappers import EpsFn

_SHOWN = 10  # indices named in a message


def _finite_rows(x) -> jax.Array | np.ndarray:
    """``(B,)`` flags: row ``i`` of ``x`` (batch axis first) is finite everywhere."""
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x)
    return xp.all(xp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


def nonfinite_samples(x) -> np.ndarray:
    """Indices (ascending, ``int64``) of the rows of ``x`` (batch axis first) that hold a NaN
    or an Inf; empty when every sample is finite.

    A JAX array is reduced where it lives, so only ``B`` flags come to the host; ``x`` must be
    fully addressable (a host's own shard of a multi-host batch, not the global array)."""
    if np.ndim(x) < 1:
        raise ValueError(f"x must have a leading batch axis, got shape {np.shape(x)}")
    return np.flatnonzero(~np.asarray(_finite_rows(x))).astype(np.int64)


def first_nonfinite_step(
    plan: SamplingPlan,
    eps_fn: EpsFn,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    index_offset: int = 0,
    sample_index: jax.Array | None = None,
    rule_params=None,
) -> np.ndarray:
    """Per sample, the first step whose result is non-finite, or -1 if none is.

    Step ``k`` maps ``plan.ts[k]`` to ``plan.ts[k + 1]``; ``plan.num_steps`` is the final
    denoising step (with ``final_denoise``). The arguments are those of
    ``sampling.sampler.sample`` (same ``key`` and sample indices: the same noise), which is
    rerun with a finite flag per sample recorded after every step -- one extra sampling pass,
    for diagnosis only. To diagnose a few rows of a batch, pass those rows of ``x_T`` with
    their ``sample_index``.

    Raises:
      ValueError: if ``x_T`` itself has non-finite rows (named).
    """
    bad_inputs = nonfinite_samples(x_T)
    if bad_inputs.size:
        raise ValueError(f"x_T is not finite in rows {_shown(bad_inputs)}: nothing to diagnose")
    _, finite = sample(plan, eps_fn, x_T, key, index_offset=index_offset,
                       sample_index=sample_index, record=_finite_rows,
                       rule_params=rule_params)  # fmt: skip
    finite = np.asarray(finite)  # (steps, B)
    return np.where(finite.all(axis=0), -1, np.argmin(finite, axis=0)).astype(np.int64)


def _shown(indices: Sequence[int]) -> str:
    """The first few of ``indices``, e.g. ``[3, 7, 9, ... (12 in all)]``."""
    head = ", ".join(str(int(i)) for i in indices[:_SHOWN])
    more = f", ... ({len(indices)} in all)" if len(indices) > _SHOWN else ""
    return f"[{head}{more}]"


class NonFiniteSamplesError(RuntimeError):
    """Sampling produced NaN/Inf in some samples; nothing of them may be written as a result.

    ``indices``: the non-finite rows (:func:`nonfinite_samples`); ``first_step``: optionally,
    their first non-finite step, aligned with ``indices`` (:func:`first_nonfinite_step`).
    """

    def __init__(self, indices: Sequence[int], first_step: Sequence[int] | None = None):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.first_step = None if first_step is None else np.asarray(first_step, np.int64)
        if self.first_step is not None and self.first_step.shape != self.indices.shape:
            raise ValueError(
                f"first_step must align with indices: shapes {self.first_step.shape} and "
                f"{self.indices.shape}"
            )
        count = self.indices.size
        message = (
            f"{count} sample{'s' if count != 1 else ''} came back non-finite (NaN or Inf): "
            f"rows {_shown(self.indices)}"
        )
        if self.first_step is not None:
            message += f"; first non-finite step {_shown(self.first_step)}"
        super().__init__(
            message + ". Check the network, the time grid's ends (t0, t1) and the dtype."
        )
