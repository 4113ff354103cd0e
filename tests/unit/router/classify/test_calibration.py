from __future__ import annotations

import numpy as np
import pytest

from router.classify.calibration import fit_power_temperature, power_softmax


def test_power_softmax_rows_sum_to_one_and_temperature_flattens() -> None:
    scores = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    sharp, flat = power_softmax(scores, 0.5), power_softmax(scores, 4.0)
    assert np.allclose(sharp.sum(axis=1), 1.0) and np.allclose(flat.sum(axis=1), 1.0)
    assert sharp[0, 0] > flat[0, 0] > 1 / 3
    assert np.allclose(flat[1], 1 / 3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        power_softmax(scores, 0.0)


def test_fitted_temperature_recovers_the_one_that_generated_the_labels() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4000, 4))
    truth = power_softmax(logits, 2.0)  # the labels follow logits / 2
    targets = np.array([rng.choice(4, p=row) for row in truth])
    assert fit_power_temperature(logits, targets) == pytest.approx(2.0, rel=0.15)


def test_fit_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="one row of scores per target"):
        fit_power_temperature(np.zeros((3, 2)), np.array([0, 1]))
