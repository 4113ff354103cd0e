"""Tuning soft routing's price per billion active parameters to an average-cost budget.

`fit_cost_weight` picks the price so that the average cost measured on validation
prompts meets a budget (the average cost falls as the price rises, so bisection works).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from router.choose.expert_choice import SoftRouting, check_probabilities, choose_experts
from router.choose.score_table import ScoreTable
from router.training.optimiser import InfeasibleBudget


def average_cost_b(experts: Sequence[str], costs_b: Mapping[str, float]) -> float:
    """Average active parameters of a routed batch (every expert must have a known cost)."""
    if not experts:
        raise ValueError("need at least one routed prompt to average over")
    try:
        values = np.array([costs_b[e] for e in experts], dtype=np.float64)
    except KeyError as error:
        raise ValueError(f"no cost known for expert {error.args[0]!r}") from None
    if np.isnan(values).any():
        unknown = sorted({e for e, v in zip(experts, values, strict=True) if np.isnan(v)})
        raise ValueError(f"experts without a known cost were routed to: {unknown}")
    return float(values.mean())


@dataclass(frozen=True)
class CostWeightFit:
    """The soft routing whose measured average cost meets the budget."""

    routing: SoftRouting
    average_active_params_b: float


def fit_cost_weight(
    probabilities: np.ndarray,
    categories: Sequence[str],
    table: ScoreTable,
    budget_b: float,
    generalist: str,
    confidence_threshold: float = 0.0,
    allowed_experts: tuple[str, ...] | None = None,
    generalist_cost_b: float | None = None,
    iterations: int = 60,
) -> CostWeightFit:
    """The smallest cost_weight whose routed average cost on these rows is <= budget_b.

    The generalist's cost comes from the table unless generalist_cost_b is given.
    """
    if not (isinstance(budget_b, numbers.Real) and math.isfinite(budget_b) and budget_b >= 0):
        raise ValueError(f"budget_b must be a finite number >= 0, got {budget_b!r}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    matrix = check_probabilities(probabilities, categories)
    if matrix.shape[0] == 0:
        raise ValueError("need at least one validation row to measure the average cost")
    costs = {e: float(c) for e, c in zip(table.experts, table.costs_b, strict=True)}
    if generalist_cost_b is not None:
        costs[generalist] = float(generalist_cost_b)
    if generalist not in costs:
        raise ValueError(f"generalist {generalist!r} is not in the table; give generalist_cost_b")

    def routed(weight: float) -> tuple[SoftRouting, float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warned once below, not per bisection step
            routing = SoftRouting(table, weight, generalist, confidence_threshold, allowed_experts)
        experts, _ = choose_experts(matrix, categories, routing)
        return routing, average_cost_b(experts, costs)

    SoftRouting(table, 1.0, generalist, confidence_threshold, allowed_experts)  # validates, warns
    routing, cost = routed(0.0)
    if cost <= budget_b:
        return CostWeightFit(routing, cost)
    # A price above the widest score gap per billion makes every row take its cheapest
    # candidate, so the routed cost cannot fall further than that.
    spread = float(np.ptp(table.scores)) if table.scores.size else 0.0
    candidate_costs = np.unique(np.nan_to_num(table.costs_b[routing.candidates], nan=0.0))
    smallest_gap = float(np.diff(candidate_costs).min()) if candidate_costs.size > 1 else 1.0
    high = 2.0 * (spread + 1.0) / max(smallest_gap, 1e-12)
    high_routing, high_cost = routed(high)
    if high_cost > budget_b:
        raise InfeasibleBudget(budget_b, high_cost)
    low = 0.0
    for _ in range(iterations):
        middle = (low + high) / 2
        middle_routing, middle_cost = routed(middle)
        if middle_cost <= budget_b:
            high, high_routing, high_cost = middle, middle_routing, middle_cost
        else:
            low = middle
    return CostWeightFit(high_routing, high_cost)
