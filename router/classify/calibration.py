"""One temperature that makes held-out category probabilities honest.

A classifier fitted with little regularisation is over-confident on prompts it has not
seen; routing on `p(c|x)` (soft mode, the confidence threshold) needs probabilities that
mean what they say. `fit_power_temperature` finds the T minimising the held-out log
loss of softmax(log p / T); `power_softmax` applies it to any log-scores.
"""

from __future__ import annotations

import numpy as np


def power_softmax(log_scores: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax(log_scores / temperature)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = np.asarray(log_scores, dtype=np.float64) / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    weights = np.exp(scaled)
    return np.asarray(weights / weights.sum(axis=1, keepdims=True))


def fit_power_temperature(log_scores: np.ndarray, targets: np.ndarray) -> float:
    """The temperature in [e^-5, e^5] with the lowest log loss of the true `targets`."""
    from scipy.optimize import minimize_scalar

    scores = np.asarray(log_scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or len(scores) != len(targets) or not len(targets):
        raise ValueError(
            f"need one row of scores per target: scores {scores.shape}, {len(targets)} targets"
        )
    rows = np.arange(len(targets))

    def loss(log_t: float) -> float:
        p = power_softmax(scores, float(np.exp(log_t)))
        return float(-np.log(np.clip(p[rows, targets], 1e-12, None)).mean())

    return float(np.exp(minimize_scalar(loss, bounds=(-5.0, 5.0), method="bounded").x))
