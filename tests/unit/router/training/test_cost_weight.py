"""Fitting soft routing's cost price to a budget, and the average cost it measures."""

from __future__ import annotations

import numpy as np
import pytest

from router.choose.expert_choice import SoftRouting, choose_experts
from router.training.cost_weight import average_cost_b, fit_cost_weight
from router.training.optimiser import InfeasibleBudget
from tests.unit.router.choose.test_expert_choice import CATEGORIES, OPEN, TABLE


def test_average_cost() -> None:
    costs = {"a": 1.0, "b": 3.0, "c": float("nan")}
    assert average_cost_b(["a", "b", "b"], costs) == pytest.approx(7 / 3)
    with pytest.raises(ValueError, match="'zzz'"):
        average_cost_b(["zzz"], costs)
    with pytest.raises(ValueError, match=r"\['c'\]"):
        average_cost_b(["a", "c"], costs)
    with pytest.raises(ValueError, match="at least one"):
        average_cost_b([], costs)


def validation_rows(seed: int = 0, n: int = 200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet([0.5, 0.5], size=n)


def test_fit_cost_weight_meets_the_budget_with_the_smallest_price() -> None:
    rows = validation_rows()
    unpriced = SoftRouting(TABLE, 0.0, "allround", allowed_experts=OPEN)
    costs = {"mathy": 7.0, "coder": 7.0, "allround": 30.0}
    assert average_cost_b(choose_experts(rows, CATEGORIES, unpriced)[0], costs) > 10.0
    fit = fit_cost_weight(rows, CATEGORIES, TABLE, 10.0, "allround", allowed_experts=OPEN)
    experts, _ = choose_experts(rows, CATEGORIES, fit.routing)
    assert fit.average_active_params_b == pytest.approx(average_cost_b(experts, costs))
    assert fit.average_active_params_b <= 10.0
    cheaper_price = SoftRouting(
        TABLE, fit.routing.cost_weight * 0.99, "allround", allowed_experts=OPEN
    )
    assert average_cost_b(choose_experts(rows, CATEGORIES, cheaper_price)[0], costs) > 10.0


def test_fit_cost_weight_is_zero_when_the_budget_is_loose() -> None:
    fit = fit_cost_weight(
        validation_rows(), CATEGORIES, TABLE, 100.0, "allround", allowed_experts=OPEN
    )
    assert fit.routing.cost_weight == 0.0


def test_fit_cost_weight_counts_the_generalist_and_reports_infeasible_budgets() -> None:
    rows = validation_rows()
    # Every row falls back to the 30B generalist: no price can bring that under 10B.
    with pytest.raises(InfeasibleBudget, match="budget 10B"):
        fit_cost_weight(
            rows,
            CATEGORIES,
            TABLE,
            10.0,
            "allround",
            confidence_threshold=1.0,
            allowed_experts=OPEN,
        )
    with pytest.raises(ValueError, match="generalist_cost_b"):
        fit_cost_weight(rows, CATEGORIES, TABLE, 10.0, "outsider", allowed_experts=OPEN)
    fit = fit_cost_weight(
        rows,
        CATEGORIES,
        TABLE,
        10.0,
        "outsider",
        confidence_threshold=1.0,
        allowed_experts=OPEN,
        generalist_cost_b=2.0,
    )
    assert fit.average_active_params_b == pytest.approx(2.0)
    with pytest.raises(ValueError, match="budget_b"):
        fit_cost_weight(rows, CATEGORIES, TABLE, -1.0, "allround")
    with pytest.raises(ValueError, match="at least one validation row"):
        fit_cost_weight(np.zeros((0, 2)), CATEGORIES, TABLE, 10.0, "allround")
