"""Named tolerances for the numeric assertions of the suite (the rule is in conftest.py's
docstring and the README's "Testing" paragraph): a tolerance is derived from the precision and
the depth of the computation, never fitted to one machine's result.

What changes the low-order bits between machines (measured with scripts/numerics_probe.py):
numpy's SIMD kernels (exp, log, power: AVX-512, AVX2 and baseline builds differ by an ulp),
XLA's CPU code (FMA contraction with optimisations on, the ISA of the convolution kernels),
the XLA pipeline (``jax_disable_most_optimizations``, another program around the same ops)
and another library altogether (the EDM and score_sde fixtures come from PyTorch / JAX on the
machines of their authors).
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23 ~ 1.19e-7
EPS64 = float(np.finfo(np.float64).eps)  # 2**-52 ~ 2.22e-16


def f32_net_rtol(depth: int) -> float:
    """Max-abs-relative tolerance, ``max |got - want| / max |want|``, between two float32
    evaluations of a network ``depth`` blocks deep that sum in different orders (another
    library, ISA or compiled program).

    A block's convolutions sum up to ~600 products each (random-walk rounding ~ sqrt(600) eps
    ~ 25 eps), two independent evaluations differ by sqrt(2) of that (~ 35 eps), and the
    blocks' errors add in quadrature: ``64 eps sqrt(depth)`` rounds this up. Measured on the
    fixture networks: at most a third of it (AVX-512, AVX, SSE4.2; XLA optimised or not).
    """
    return 64 * EPS32 * math.sqrt(depth)


def solve_rtol(dtype, nfe: int) -> float:
    """Max-abs-relative tolerance between two solves of the same plan that round differently
    (another compiled program -- constants vs arguments, jit vs eager, another batch shape --
    or another ISA), in the working precision ``dtype``, after ``nfe`` evaluations.

    Each evaluation and update rounds at a few eps, a multistep update sums ~4 terms with
    coefficients up to ~10, and the flow can grow a difference a few fold over the solve:
    ``256 eps nfe``. Measured: at most an eighth of it (float32 tAB3 at NFE 6 on other batch
    shapes, 1.1e-5, docs/scale.md; float64 at NFE 7, XLA optimised vs not, 4.5e-14).
    """
    return 256 * float(np.finfo(dtype).eps) * nfe


def assert_close_max_rel(actual, desired, rtol: float, err_msg: str = "") -> None:
    """``max |actual - desired| <= rtol * max |desired|``: a tolerance relative to the array's
    scale (per-element relative errors mean nothing where samples cross zero)."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rtol * scale, err_msg=err_msg)


def ulp_distance(actual, desired) -> np.ndarray:
    """Elementwise distance in units in the last place of ``desired``'s float dtype (0 for
    equal values, including +0 / -0 and NaN / NaN)."""
    desired = np.asarray(desired)
    dtype = desired.dtype if desired.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    ints = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}[dtype]

    def ordered(x):  # IEEE bits as integers that are monotone in the value
        i = np.asarray(x, dtype).view(ints).astype(np.int64)
        return np.where(i < 0, np.iinfo(ints).min - i, i)

    a, d = np.asarray(actual, dtype), np.asarray(desired, dtype)
    dist = np.abs(ordered(a) - ordered(d))
    same = (a == d) | (np.isnan(a) & np.isnan(d))
    return np.where(same, 0, dist)


def assert_close_ulp(actual, desired, ulps: int, err_msg: str = "") -> None:
    """``actual`` within ``ulps`` units in the last place of ``desired``, elementwise: for
    values that went through a few correctly rounded or last-bit-accurate operations (a
    round trip), where a relative tolerance would have to name the ulp anyway."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
    dist = ulp_distance(actual, desired)
    worst = int(np.max(dist)) if dist.size else 0
    if worst > ulps:
        k = int(np.argmax(dist))
        raise AssertionError(
            f"{err_msg + ': ' if err_msg else ''}{np.count_nonzero(dist > ulps)} of {dist.size} "
            f"values differ by more than {ulps} ulp; the worst by {worst} ulp at flat index {k}: "
            f"{actual.ravel()[k]!r} vs {desired.ravel()[k]!r}"
        )


# The small score_sde fixture networks (NCSN++ / DDPM++, ch_mult (1, 2, 2), one residual block
# per level, tests/fixtures/score_sde): 15 residual blocks on the longest path.
SCORE_SDE_FIXTURE_RTOL = f32_net_rtol(15)
