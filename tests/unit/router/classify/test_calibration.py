"""Applying a temperature to category log-scores."""

from __future__ import annotations

import numpy as np
import pytest

from router.classify.calibration import power_softmax


def test_power_softmax_rows_sum_to_one_and_temperature_flattens() -> None:
    scores = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    sharp, flat = power_softmax(scores, 0.5), power_softmax(scores, 4.0)
    assert np.allclose(sharp.sum(axis=1), 1.0) and np.allclose(flat.sum(axis=1), 1.0)
    assert sharp[0, 0] > flat[0, 0] > 1 / 3
    assert np.allclose(flat[1], 1 / 3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        power_softmax(scores, 0.0)
