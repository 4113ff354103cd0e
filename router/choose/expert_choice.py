"""From category probabilities to an expert, for a whole batch at once.

Two rules share one entry point, `choose_experts`:

- `HardRouting`: the most probable category's expert from a fixed map (the rule of the
  Samba-CoE paper); below the confidence threshold the generalist answers.
- `SoftRouting`: the expert with the best expected quality over the category
  distribution, minus a price per billion active parameters:
  argmax_e sum_c p(c|x) * scores[c, e] - cost_weight * costs_b[e]. An unsure prompt
  then goes to an expert that is good on all its likely categories instead of to the
  expert of a category it may not belong to.

The price itself is tuned offline (router.training.cost_weight.fit_cost_weight).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from router.choose.score_table import ScoreTable

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


def check_probabilities(probabilities: np.ndarray, categories: Sequence[str]) -> np.ndarray:
    """p(category | prompt) as a float matrix, checked: rows >= 0 that sum to 1."""
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
    matrix = check_probabilities(probabilities, categories)
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
