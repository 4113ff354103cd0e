"""Fitting the one temperature that makes held-out category probabilities honest.

router.classify.calibration.power_softmax applies a temperature T to log-scores; this
finds the T minimising the log loss of softmax(log p / T) on rows the classifier did
not see, so that p(c|x) means what it says when soft routing and the confidence
threshold read it.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from router.classify.calibration import power_softmax


def fit_power_temperature(log_scores: np.ndarray, targets: np.ndarray) -> float:
    """The temperature in [e^-5, e^5] with the lowest log loss of the true `targets`."""
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
