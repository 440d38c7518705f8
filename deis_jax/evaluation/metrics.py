"""Sample-level metrics computed on the host in float64."""

from __future__ import annotations

import numpy as np


def rmse(x, y) -> float:
    """Root-mean-square difference over samples and dimensions."""
    d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    return float(np.sqrt(np.mean(d**2)))


def mean_log_prob(log_prob, x, batch_size: int = 512) -> float:
    """``mean(log_prob(x))`` over the rows of ``x``, in batches (``log_prob`` may hold a
    ``(B, K, D)`` intermediate)."""
    x = np.asarray(x, np.float64)
    total = sum(
        float(np.sum(log_prob(x[i : i + batch_size]))) for i in range(0, len(x), batch_size)
    )
    return total / len(x)


def nll_gap(log_prob, samples, data) -> float:
    """Excess negative log-likelihood per dimension under the true density ``log_prob``.

    ``mean(-log p(samples))/D - mean(-log p(data))/D`` with ``data`` exact draws: 0 up to
    Monte-Carlo error for a perfect sampler, positive when samples fall off the data (e.g.
    between the modes of a mixture), in nats per dimension. ``data`` may also be given as its
    ``mean(log p(data))`` (a float, computed once by :func:`mean_log_prob`).
    """
    samples = np.asarray(samples, np.float64)
    dim = samples.reshape(len(samples), -1).shape[1]
    data_term = data if isinstance(data, float) else mean_log_prob(log_prob, data)
    return float((data_term - mean_log_prob(log_prob, samples)) / dim)
