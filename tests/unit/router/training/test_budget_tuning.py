from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from router.choose.expert_choice import SoftRouting
from router.training.budget_tuning import (
    cross_fitted_utilities,
    oracle_accuracy,
    report_on_test,
    routed_outcome,
    score_table,
    tune_cross_fitted_soft,
)
from router.training.mmlu_pro import MMLUProData, load_dataset
from tests.unit.router.training.test_mmlu_pro import write_synthetic_dataset

SIZED = ["small", "mid", "big"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> MMLUProData:
    directory: Path = tmp_path_factory.mktemp("tuning") / "data"
    write_synthetic_dataset(directory, per_topic=60)
    return load_dataset(directory)


def noisy_probabilities(data: MMLUProData, classes: list[str], seed: int = 0) -> np.ndarray:
    """A router that is right most of the time and says so."""
    rng = np.random.default_rng(seed)
    truth = np.eye(len(classes))[[classes.index(c) for c in data.categories]]
    mixed = 0.7 * truth + 0.3 * rng.dirichlet(np.ones(len(classes)), size=len(truth))
    return np.asarray(mixed / mixed.sum(axis=1, keepdims=True))


def test_cross_fitted_utilities_never_use_a_rows_own_outcome() -> None:
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(3), size=30)
    correctness = rng.integers(0, 2, size=(30, 4)).astype(float)
    fold_of = np.arange(30) % 3
    before = cross_fitted_utilities(probabilities, correctness, fold_of)
    changed = correctness.copy()
    changed[fold_of == 0] = 1 - changed[fold_of == 0]  # fold 0's own outcomes flip
    after = cross_fitted_utilities(probabilities, changed, fold_of)
    assert np.allclose(before[fold_of == 0], after[fold_of == 0])
    assert not np.allclose(before[fold_of == 1], after[fold_of == 1])
    # Each row's utility is its probabilities times the other folds' probability-weighted means.
    kept = fold_of != 0
    scores = (probabilities[kept].T @ correctness[kept]) / probabilities[kept].sum(axis=0)[:, None]
    assert np.allclose(before[fold_of == 0], probabilities[fold_of == 0] @ scores)


def test_cross_fitting_needs_matching_rows_and_two_folds() -> None:
    with pytest.raises(ValueError, match="need one row each"):
        cross_fitted_utilities(np.ones((3, 2)) / 2, np.ones((2, 2)), np.arange(3))
    with pytest.raises(ValueError, match="at least two folds"):
        cross_fitted_utilities(np.ones((3, 2)) / 2, np.ones((3, 2)), np.zeros(3))


@pytest.mark.parametrize("budget_b", [10.0, 25.0, 45.0])
def test_cross_fitted_soft_routing_meets_the_budget_on_validation(
    data: MMLUProData, budget_b: float
) -> None:
    classes = sorted(set(data.categories))
    probabilities = noisy_probabilities(data, classes)
    table = score_table(probabilities, data, classes, SIZED)
    fold_of = np.arange(len(data)) % 4
    tuned = tune_cross_fitted_soft(budget_b, data, probabilities, classes, table, fold_of, "big")
    assert tuned is not None and isinstance(tuned.routing, SoftRouting)
    assert tuned.validation_cost_b <= budget_b
    report = report_on_test(budget_b, budget_b, tuned, data, probabilities, classes)
    assert set(report["experts_used"]) <= set(SIZED)
    assert report["cost_weight"] == tuned.routing.cost_weight
    # Specialists beat the generalist: small on math, mid on law.
    big_alone = data.correctness[:, data.experts.index("big")].mean()
    if budget_b >= 25:
        assert tuned.validation_accuracy > big_alone


def test_cross_fitted_soft_routing_is_none_when_nothing_fits(data: MMLUProData) -> None:
    classes = sorted(set(data.categories))
    probabilities = noisy_probabilities(data, classes)
    table = score_table(probabilities, data, classes, SIZED)
    fold_of = np.arange(len(data)) % 4
    assert tune_cross_fitted_soft(4.0, data, probabilities, classes, table, fold_of, "big") is None
    # Only the fallback threshold of 1.0 sends everything to the 70B generalist: over 60B.
    assert (
        tune_cross_fitted_soft(
            60.0, data, probabilities, classes, table, fold_of, "big", thresholds=(1.0,)
        )
        is None
    )


def test_fallback_rows_go_to_the_generalist(data: MMLUProData) -> None:
    classes = sorted(set(data.categories))
    probabilities = noisy_probabilities(data, classes)
    table = score_table(probabilities, data, classes, SIZED)
    fold_of = np.arange(len(data)) % 4
    tuned = tune_cross_fitted_soft(
        80.0, data, probabilities, classes, table, fold_of, "big", thresholds=(1.0,)
    )
    assert tuned is not None
    assert tuned.validation_cost_b == pytest.approx(70.0)
    big = data.correctness[:, data.experts.index("big")].mean()
    assert tuned.validation_accuracy == pytest.approx(big)


def test_oracle_and_outcome_use_recorded_correctness(data: MMLUProData) -> None:
    classes = sorted(set(data.categories))
    table = score_table(
        np.eye(len(classes))[[classes.index(c) for c in data.categories]], data, classes, SIZED
    )
    accuracy, cost, _ = routed_outcome(data, ["small"] * len(data))
    assert accuracy == pytest.approx(data.correctness[:, 0].mean()) and cost == 5.0
    unlimited = oracle_accuracy(None, table, data, data.categories, "big")
    assert unlimited >= max(data.correctness[:, :3].mean(axis=0))
    assert np.isnan(oracle_accuracy(1.0, table, data, data.categories, "big"))
    assert report_on_test(1.0, None, None, data, np.ones((len(data), 3)) / 3, classes) == {
        "budget_b": 1.0,
        "feasible": False,
    }
