"""Sample-level metrics computed on the host in float64."""

from __future__ import annotations

import numpy as np


def rmse(x, y) -> float:
    """Root-mean-square difference over samples and dimensions."""
    d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    return float(np.sqrt(np.mean(d**2)))


def nll_gap(log_prob, samples, data) -> float:
    """Excess negative log-likelihood per dimension under the true density ``log_prob``.

    ``mean(-log p(samples))/D - mean(-log p(data))/D`` with ``data`` exact draws: 0 up to
    Monte-Carlo error for a perfect sampler, positive when samples fall off the data (e.g.
    between the modes of a mixture), in nats per dimension.
    """
    samples = np.asarray(samples, np.float64)
    dim = samples.reshape(len(samples), -1).shape[1]
    return float((np.mean(log_prob(data)) - np.mean(log_prob(samples))) / dim)
