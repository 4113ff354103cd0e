"""From category probabilities to an expert, for a whole batch at once.

Two rules share one entry point, `choose_experts`:

- `HardRouting`: the most probable category's expert from a fixed map (the rule of the
  Samba-CoE paper); below the confidence threshold the generalist answers.
- `SoftRouting`: the expert with the best expected quality over the category
  distribution, minus a price per billion active parameters:
  argmax_e sum_c p(c|x) * scores[c, e] - cost_weight * costs_b[e]. An unsure prompt
  then goes to an expert that is good on all its likely categories instead of to the
  expert of a category it may not belong to.

`fit_cost_weight` picks the price so that the average cost measured on validation
prompts meets a budget (the average cost falls as the price rises, so bisection works).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from router.training.optimiser import InfeasibleBudget, ScoreTable

# Rows of a probability matrix must sum to 1 within this; catches logits passed by mistake.
_ROW_SUM_TOLERANCE = 1e-3


def _check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, numbers.Real) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"confidence_threshold must be in [0, 1], got {threshold!r}")


@dataclass(frozen=True)
class HardRouting:
    """Most probable category -> its mapped expert; below the threshold -> the generalist."""

    assignment: Mapping[str, str]
    generalist: str
    confidence_threshold: float

    def __post_init__(self) -> None:
        _check_threshold(self.confidence_threshold)
        if not self.generalist:
            raise ValueError("generalist must be a non-empty expert name")


@dataclass(frozen=True, eq=False)
class SoftRouting:
    """argmax_e sum_c p(c|x) * scores[c, e] - cost_weight * costs_b[e], with a fallback."""

    table: ScoreTable
    cost_weight: float
    generalist: str
    confidence_threshold: float = 0.0
    allowed_experts: tuple[str, ...] | None = None
    # Derived once: candidate expert indices (cheapest first, so ties go to the cheaper).
    candidates: np.ndarray = field(init=False, repr=False)
    penalties: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_threshold(self.confidence_threshold)
        weight = self.cost_weight
        if not (isinstance(weight, numbers.Real) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"cost_weight must be a finite number >= 0, got {weight!r}")
        if not self.generalist:
            raise ValueError("generalist must be a non-empty expert name")
        table = self.table
        if self.allowed_experts is None:
            unknown = [e for e, c in zip(table.experts, table.costs_b, strict=True) if np.isnan(c)]
            if unknown and weight > 0:
                warnings.warn(
                    f"experts without a known size are left out of soft routing: {unknown}",
                    stacklevel=3,
                )
            allowed = [e for e in table.experts if not (weight > 0 and e in unknown)]
        else:
            allowed = list(self.allowed_experts)
            if not allowed:
                raise ValueError("allowed_experts is empty")
            strangers = [e for e in allowed if e not in table.experts]
            if strangers:
                raise ValueError(
                    f"allowed_experts {strangers} are not in the table {list(table.experts)}"
                )
            for expert in allowed:
                cost = table.costs_b[table.expert_index(expert)]
                if np.isnan(cost) and weight > 0:
                    raise ValueError(
                        f"expert {expert!r} has no known size, so it cannot be priced "
                        f"at cost_weight {weight}"
                    )
        indices = np.array([table.expert_index(e) for e in allowed], dtype=np.int64)
        costs = np.nan_to_num(table.costs_b[indices], nan=0.0)
        order = np.lexsort((indices, costs))
        object.__setattr__(self, "candidates", indices[order])
        object.__setattr__(self, "penalties", weight * costs[order])

    def utilities(self, probabilities: np.ndarray, categories: Sequence[str]) -> np.ndarray:
        """(N, candidates) expected quality minus cost price; columns follow `candidates`."""
        rows = []
        for category in categories:
            try:
                rows.append(self.table.category_index(category))
            except KeyError:
                raise ValueError(
                    f"classifier category {category!r} has no scores in the table "
                    f"(table categories: {list(self.table.categories)})"
                ) from None
        scores = self.table.scores[np.array(rows, dtype=np.int64)][:, self.candidates]
        return probabilities @ scores - self.penalties[None, :]


def _check_probabilities(probabilities: np.ndarray, categories: Sequence[str]) -> np.ndarray:
    matrix = np.asarray(probabilities, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(categories):
        raise ValueError(
            f"probabilities must have shape (N, {len(categories)}) for categories "
            f"{list(categories)}, got {matrix.shape}"
        )
    if matrix.size and not np.isfinite(matrix).all():
        raise ValueError("probabilities contain NaN or infinite values")
    if matrix.size and (
        matrix.min() < -1e-9 or np.abs(matrix.sum(axis=1) - 1).max() > _ROW_SUM_TOLERANCE
    ):
        worst = int(np.argmax(np.abs(matrix.sum(axis=1) - 1)))
        raise ValueError(
            f"probability rows must be >= 0 and sum to 1; row {worst} sums to "
            f"{matrix[worst].sum():.6g}"
        )
    return matrix


def choose_experts(
    probabilities: np.ndarray,
    categories: Sequence[str],
    routing: HardRouting | SoftRouting,
) -> tuple[list[str], np.ndarray]:
    """The expert for each row of p(category | prompt), and which rows fell back."""
    if not isinstance(routing, HardRouting | SoftRouting):
        raise TypeError(f"routing must be HardRouting or SoftRouting, got {type(routing).__name__}")
    matrix = _check_probabilities(probabilities, categories)
    if matrix.shape[0] == 0:
        return [], np.zeros(0, dtype=bool)
    fallback = matrix.max(axis=1) < routing.confidence_threshold
    if isinstance(routing, HardRouting):
        missing = [c for c in categories if c not in routing.assignment]
        if missing:
            raise ValueError(f"categories without an expert in the map: {missing}")
        by_column = np.array([routing.assignment[c] for c in categories], dtype=object)
        chosen = by_column[np.argmax(matrix, axis=1)]
    else:
        best = np.argmax(routing.utilities(matrix, categories), axis=1)
        names = np.array(routing.table.experts, dtype=object)
        chosen = names[routing.candidates[best]]
    experts = [routing.generalist if f else str(e) for e, f in zip(chosen, fallback, strict=True)]
    return experts, fallback


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
    matrix = _check_probabilities(probabilities, categories)
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
