"""One temperature that makes held-out category probabilities honest.

A classifier fitted with little regularisation is over-confident on prompts it has not
seen; routing on `p(c|x)` (soft mode, the confidence threshold) needs probabilities that
mean what they say. `power_softmax` applies a temperature T to any log-scores:
softmax(log p / T). T itself is fitted on held-out rows by
router.training.temperature_fit.fit_power_temperature.
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
