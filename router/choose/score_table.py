"""The category x expert score table the map optimiser and soft routing work from."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _float_array(values: object, name: str, ndim: int) -> np.ndarray:
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric, got {values!r}") from error
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    array.setflags(write=False)
    return array


def _check_names(names: Sequence[str], what: str) -> tuple[str, ...]:
    result = tuple(names)
    if not result:
        raise ValueError(f"need at least one {what}")
    for name in result:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what} names must be non-empty strings, got {name!r}")
    duplicates = sorted({n for n in result if result.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate {what} names: {duplicates}")
    return result


@dataclass(frozen=True, eq=False)
class ScoreTable:
    """Expected quality of every expert on every category, with costs and category weights."""

    categories: tuple[str, ...]
    experts: tuple[str, ...]
    scores: np.ndarray  # (C, E) expected quality of expert e on category c
    costs_b: np.ndarray  # (E,) active parameters in billions; NaN = unknown size
    frequencies: np.ndarray  # (C,) share of traffic per category, sums to 1

    def __post_init__(self) -> None:
        categories = _check_names(self.categories, "category")
        experts = _check_names(self.experts, "expert")
        scores = _float_array(self.scores, "scores", 2)
        costs = _float_array(self.costs_b, "costs_b", 1)
        frequencies = _float_array(self.frequencies, "frequencies", 1)
        if scores.shape != (len(categories), len(experts)):
            raise ValueError(
                f"scores has shape {scores.shape}, expected "
                f"({len(categories)} categories, {len(experts)} experts)"
            )
        if not np.isfinite(scores).all():
            bad = np.argwhere(~np.isfinite(scores))[0]
            raise ValueError(
                f"score of expert {experts[bad[1]]!r} on category {categories[bad[0]]!r} "
                f"is {scores[bad[0], bad[1]]}, not finite"
            )
        if costs.shape != (len(experts),):
            raise ValueError(f"costs_b has {costs.shape[0]} entries for {len(experts)} experts")
        for expert, cost in zip(experts, costs, strict=True):
            if not math.isnan(cost) and not (math.isfinite(cost) and cost >= 0):
                raise ValueError(f"cost of expert {expert!r} must be >= 0 or NaN, got {cost}")
        if frequencies.shape != (len(categories),):
            raise ValueError(
                f"frequencies has {frequencies.shape[0]} entries for {len(categories)} categories"
            )
        for category, frequency in zip(categories, frequencies, strict=True):
            if not (math.isfinite(frequency) and frequency >= 0):
                raise ValueError(
                    f"frequency of category {category!r} must be >= 0, got {frequency}"
                )
        if abs(frequencies.sum() - 1.0) > 1e-6:
            raise ValueError(f"frequencies must sum to 1, got {frequencies.sum():.6g}")
        object.__setattr__(self, "categories", categories)
        object.__setattr__(self, "experts", experts)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "costs_b", costs)
        object.__setattr__(self, "frequencies", frequencies)

    def expert_index(self, expert: str) -> int:
        try:
            return self.experts.index(expert)
        except ValueError:
            raise KeyError(f"unknown expert {expert!r}; known: {list(self.experts)}") from None

    def category_index(self, category: str) -> int:
        try:
            return self.categories.index(category)
        except ValueError:
            raise KeyError(
                f"unknown category {category!r}; known: {list(self.categories)}"
            ) from None

    def known_cost_experts(self) -> tuple[str, ...]:
        return tuple(e for e, c in zip(self.experts, self.costs_b, strict=True) if not np.isnan(c))

    def with_expert(self, expert: str, scores: Sequence[float], cost_b: float) -> ScoreTable:
        """A copy with one more expert (one score per category, in category order)."""
        if expert in self.experts:
            raise ValueError(f"expert {expert!r} is already in the table")
        column = _float_array(scores, f"scores of {expert!r}", 1)
        if column.shape != (len(self.categories),):
            raise ValueError(
                f"expert {expert!r} needs {len(self.categories)} scores, got {column.shape[0]}"
            )
        return ScoreTable(
            self.categories,
            (*self.experts, expert),
            np.column_stack([self.scores, column]),
            np.append(self.costs_b, cost_b),
            self.frequencies,
        )

    def with_category(self, category: str, scores: Sequence[float], frequency: float) -> ScoreTable:
        """A copy with one more category; the old frequencies shrink to make room for it."""
        if category in self.categories:
            raise ValueError(f"category {category!r} is already in the table")
        if not 0.0 <= frequency < 1.0:
            raise ValueError(f"frequency of a new category must be in [0, 1), got {frequency}")
        row = _float_array(scores, f"scores of {category!r}", 1)
        if row.shape != (len(self.experts),):
            raise ValueError(
                f"category {category!r} needs {len(self.experts)} scores, got {row.shape[0]}"
            )
        return ScoreTable(
            (*self.categories, category),
            self.experts,
            np.vstack([self.scores, row]),
            self.costs_b,
            np.append(self.frequencies * (1.0 - frequency), frequency),
        )


def score_table_from_correctness(
    categories_per_question: Sequence[str],
    correctness: np.ndarray,
    experts: Sequence[str],
    costs_b: Sequence[float],
    categories: Sequence[str] | None = None,
    prior_strength: float = 0.0,
) -> ScoreTable:
    """Per-category mean correctness of every expert, weighted by how often each category occurs.

    The labels may be true categories or a router's predicted ones; predicted labels fold
    the router's confusion into the scores. prior_strength > 0 shrinks a small category's
    scores toward the expert's overall accuracy, as if that many extra questions had been
    answered at the overall rate. A category with no questions gets the overall rate.
    """
    labels = list(categories_per_question)
    matrix = _float_array(correctness, "correctness", 2)
    if matrix.shape != (len(labels), len(experts)):
        raise ValueError(
            f"correctness has shape {matrix.shape}, expected "
            f"({len(labels)} questions, {len(experts)} experts)"
        )
    if not labels:
        raise ValueError("need at least one question")
    if not (math.isfinite(prior_strength) and prior_strength >= 0):
        raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
    matrix = np.nan_to_num(matrix, nan=0.0)
    names = tuple(sorted(set(labels))) if categories is None else tuple(categories)
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        raise ValueError(f"questions carry categories not in {list(names)}: {unknown}")
    rows = np.array([index[label] for label in labels], dtype=np.int64)
    counts = np.bincount(rows, minlength=len(names)).astype(np.float64)
    sums = np.zeros((len(names), len(experts)))
    np.add.at(sums, rows, matrix)
    overall = matrix.mean(axis=0)
    denominator = counts[:, None] + prior_strength
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = (sums + prior_strength * overall[None, :]) / denominator
    scores[denominator[:, 0] == 0] = overall
    return ScoreTable(
        names, tuple(experts), scores, np.array(costs_b, dtype=np.float64), counts / counts.sum()
    )
