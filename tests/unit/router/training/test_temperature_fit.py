"""Fitting the temperature that makes held-out category probabilities honest."""

from __future__ import annotations

import numpy as np
import pytest

from router.classify.calibration import power_softmax
from router.training.temperature_fit import fit_power_temperature


def test_fitted_temperature_recovers_the_one_that_generated_the_labels() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4000, 4))
    truth = power_softmax(logits, 2.0)  # the labels follow logits / 2
    targets = np.array([rng.choice(4, p=row) for row in truth])
    assert fit_power_temperature(logits, targets) == pytest.approx(2.0, rel=0.15)


def test_fit_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="one row of scores per target"):
        fit_power_temperature(np.zeros((3, 2)), np.array([0, 1]))
