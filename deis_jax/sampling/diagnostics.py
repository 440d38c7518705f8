"""Non-finite samples: which rows came back NaN/Inf, and the error that names them.

    bad = nonfinite_samples(x0)                       # cheap: once per batch, at the end
    if bad.size:
        steps = first_nonfinite_step(plan, eps_fn, x_T[bad])   # optional: rerun those rows
        raise NonFiniteSamplesError(bad, steps)

The sampling loop itself is never slowed down: :func:`nonfinite_samples` looks at the final
samples only; ``sampling.sampler.first_nonfinite_step`` (and ``sample(...,
check_finite=True)``) run the *same* plan through the one generic loop with a per-sample
finite flag (:func:`finite_rows`) recorded after each step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_SHOWN = 10  # indices named in a message


def finite_rows(x) -> jax.Array | np.ndarray:
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
    return np.flatnonzero(~np.asarray(finite_rows(x))).astype(np.int64)


def shown(indices: Sequence[int]) -> str:
    """The first few of ``indices``, e.g. ``[3, 7, 9, ... (12 in all)]``."""
    head = ", ".join(str(int(i)) for i in indices[:_SHOWN])
    more = f", ... ({len(indices)} in all)" if len(indices) > _SHOWN else ""
    return f"[{head}{more}]"


class NonFiniteSamplesError(RuntimeError):
    """Sampling produced NaN/Inf in some samples; nothing of them may be written as a result.

    ``indices``: the non-finite rows (:func:`nonfinite_samples`); ``first_step``: optionally,
    their first non-finite step, aligned with ``indices``
    (``sampling.sampler.first_nonfinite_step``).
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
            f"rows {shown(self.indices)}"
        )
        if self.first_step is not None:
            message += f"; first non-finite step {shown(self.first_step)}"
        super().__init__(
            message + ". Check the network, the time grid's ends (t0, t1) and the dtype."
        )
