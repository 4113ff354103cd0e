"""Choosing the category -> expert map: the best expected quality under an average-cost budget.

The problem is a multiple-choice knapsack: every category picks exactly one expert,
the objective is sum_c f_c * s[c, e(c)] and the constraint sum_c f_c * cost[e(c)] <= B.
It is solved exactly by dynamic programming over Pareto sets: after each category
the partial maps that are worse AND more expensive than another are dropped, so the
survivors are exactly the (cost, quality) Pareto frontier of the categories so far.
For one budget, partial maps are also pruned when they can no longer fit the budget,
or when even the LP relaxation of the remaining categories (concave, so an upper
bound) cannot lift them to a complete map already known to fit (branch and bound).
Both prunes only remove maps that cannot be optimal, so the answer stays exact.

Ties are broken deterministically: among maps of equal quality (to 1e-12 relative)
the cheaper wins; among equal cost and quality, the one built from cheaper, earlier
listed options; a category with zero frequency gets its best-scoring expert.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from router.choose.score_table import ScoreTable

__all__ = [
    "InfeasibleBudget",
    "MapChoice",
    "map_choice",
    "minimum_cost_b",
    "optimise_map",
    "quality_frontier",
]

# Objective values closer than this (relative) count as equal: sums of the same terms
# in a different order differ in the last bits, and those must not look like gains.
_RELATIVE_TOLERANCE = 1e-12


class InfeasibleBudget(ValueError):
    """No map fits the budget; the message names the budget and the cheapest map's cost."""

    def __init__(self, budget_b: float, minimum_b: float) -> None:
        super().__init__(
            f"budget {budget_b:g}B average active parameters is infeasible: "
            f"the cheapest map costs {minimum_b:.6g}B"
        )
        self.budget_b = budget_b
        self.minimum_b = minimum_b


@dataclass(frozen=True)
class MapChoice:
    """One category -> expert map and what it is expected to give and cost."""

    assignment: dict[str, str]
    expected_quality: float
    avg_active_params_b: float
    experts_used: tuple[str, ...]


def map_choice(table: ScoreTable, assignment: dict[str, str]) -> MapChoice:
    """Score any complete map (hand-written ones too) the same way the optimiser does."""
    missing = [c for c in table.categories if c not in assignment]
    if missing:
        raise ValueError(f"map has no expert for categories {missing}")
    rows = np.arange(len(table.categories))
    columns = np.array([table.expert_index(assignment[c]) for c in table.categories])
    used = sorted(set(columns.tolist()))
    return MapChoice(
        assignment={c: assignment[c] for c in table.categories},
        expected_quality=float(table.frequencies @ table.scores[rows, columns]),
        avg_active_params_b=float(table.frequencies @ table.costs_b[columns]),
        experts_used=tuple(table.experts[i] for i in used),
    )


def _budgeted_experts(table: ScoreTable) -> np.ndarray:
    """Indices of experts with a known cost; warns naming the others."""
    unknown = [e for e, c in zip(table.experts, table.costs_b, strict=True) if np.isnan(c)]
    if unknown:
        warnings.warn(
            f"experts without a known size are left out of budgeted selection: {unknown}",
            stacklevel=3,
        )
    known = np.flatnonzero(~np.isnan(table.costs_b))
    if known.size == 0:
        raise ValueError(f"no expert has a known cost; experts: {list(table.experts)}")
    return known


def _category_options(table: ScoreTable, experts: np.ndarray) -> list[np.ndarray]:
    """Per category, the experts worth considering, in tie-break order.

    An expert that is no better and no cheaper than another on a category can be
    replaced by it in any map, so only each category's own Pareto set remains.
    A category with zero frequency keeps one expert: the best-scoring, then cheapest.
    """
    costs = table.costs_b[experts]
    options = []
    for row, frequency in zip(table.scores, table.frequencies, strict=True):
        scores = row[experts]
        # Sorted by cost, then score descending, then table order: the tie-break order.
        order = np.lexsort((experts, -scores, costs))
        if frequency == 0.0:
            best = np.lexsort((experts, costs, -scores))[0]
            options.append(experts[[best]])
            continue
        kept, best_score = [], -np.inf
        for position in order:
            if scores[position] > best_score:
                kept.append(experts[position])
                best_score = scores[position]
        options.append(np.array(kept, dtype=np.int64))
    return options


@dataclass
class _Layer:
    """Survivors after one category: how each extends a survivor of the previous layer."""

    parent: np.ndarray
    expert: np.ndarray


def _suffix_sums(values: Sequence[float]) -> np.ndarray:
    """Entry i: the sum of the values after position i (0 for the last)."""
    return np.append(np.cumsum(np.asarray(values, dtype=np.float64)[::-1])[::-1], 0.0)[1:]


def _hull_increments(cost: np.ndarray, quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps along the upper concave hull of one category's (cost, quality) options.

    Starting from the cheapest option, each step moves to the next hull vertex; the
    steps come out with falling quality-per-cost, which the LP relaxation takes greedily.
    """
    order = np.lexsort((-quality, cost))
    hull: list[int] = []
    for i in order:
        if hull and cost[i] == cost[hull[-1]]:
            continue  # same cost, lower quality
        if hull and quality[i] <= quality[hull[-1]]:
            continue  # dearer and no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # Drop b when it lies on or below the segment from a to i.
            if (quality[b] - quality[a]) * (cost[i] - cost[a]) <= (quality[i] - quality[a]) * (
                cost[b] - cost[a]
            ):
                hull.pop()
            else:
                break
        hull.append(int(i))
    vertices = np.array(hull, dtype=np.int64)
    return np.diff(cost[vertices]), np.diff(quality[vertices])


@dataclass
class _RestBounds:
    """For the categories after a position: the LP relaxation's quality for any budget.

    The LP curve (breakpoints x = cost, y = quality) is concave, so it bounds every map
    of those categories from above; its breakpoints are maps of hull vertices, so the
    last breakpoint within a budget is a real map that fits it (a lower bound).
    """

    x: list[np.ndarray]
    y: list[np.ndarray]

    @classmethod
    def build(
        cls, weighted_cost: list[np.ndarray], weighted_quality: list[np.ndarray]
    ) -> _RestBounds:
        cheapest = [
            int(np.lexsort((-q, c))[0])
            for c, q in zip(weighted_cost, weighted_quality, strict=True)
        ]
        steps = [
            _hull_increments(c, q) for c, q in zip(weighted_cost, weighted_quality, strict=True)
        ]
        cheapest_cost = [float(c[i]) for c, i in zip(weighted_cost, cheapest, strict=True)]
        cheapest_quality = [float(q[i]) for q, i in zip(weighted_quality, cheapest, strict=True)]
        base_costs, base_qualities = _suffix_sums(cheapest_cost), _suffix_sums(cheapest_quality)
        xs, ys = [], []
        for position, base_cost, base_quality in zip(
            range(len(weighted_cost)), base_costs, base_qualities, strict=True
        ):
            rest = range(position + 1, len(weighted_cost))
            step_cost = np.concatenate([steps[c][0] for c in rest] + [np.zeros(0)])
            step_quality = np.concatenate([steps[c][1] for c in rest] + [np.zeros(0)])
            order = np.argsort(-step_quality / step_cost, kind="stable")
            xs.append(base_cost + np.concatenate(([0.0], np.cumsum(step_cost[order]))))
            ys.append(base_quality + np.concatenate(([0.0], np.cumsum(step_quality[order]))))
        return cls(xs, ys)

    def bounds(self, position: int, room: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(upper, lower) bounds on the quality the later categories add within `room`."""
        x, y = self.x[position], self.y[position]
        upper = np.interp(room, x, y)
        last_fitting = np.searchsorted(x, room, side="right") - 1
        lower = np.where(last_fitting >= 0, y[np.maximum(last_fitting, 0)], -np.inf)
        return upper, lower


def _pareto_dp(
    table: ScoreTable, options: list[np.ndarray], budget_b: float | None
) -> tuple[np.ndarray, np.ndarray, list[_Layer]]:
    frequencies = table.frequencies
    weighted_cost = [frequencies[c] * table.costs_b[o] for c, o in enumerate(options)]
    weighted_quality = [frequencies[c] * table.scores[c, o] for c, o in enumerate(options)]
    scale = max(1.0, float(np.abs(table.scores).max()))
    quality_tolerance = _RELATIVE_TOLERANCE * scale * len(options)
    rest = None if budget_b is None else _RestBounds.build(weighted_cost, weighted_quality)
    cost_slack = 0.0 if budget_b is None else 1e-9 * max(1.0, budget_b)

    cost, quality = np.zeros(1), np.zeros(1)
    layers: list[_Layer] = []
    lower_bound = -np.inf
    for position, option in enumerate(options):
        k = len(option)
        new_cost = (cost[:, None] + weighted_cost[position][None, :]).ravel()
        new_quality = (quality[:, None] + weighted_quality[position][None, :]).ravel()
        parent = np.repeat(np.arange(len(cost)), k)
        choice = np.tile(np.arange(k), len(cost))
        if rest is not None and budget_b is not None:
            room = budget_b + cost_slack - new_cost
            upper, lower = rest.bounds(position, room)
            fits = lower > -np.inf
            if fits.any():
                lower_bound = max(lower_bound, float((new_quality + lower).max()))
            keep = fits & (new_quality + upper >= lower_bound - quality_tolerance)
            new_cost, new_quality = new_cost[keep], new_quality[keep]
            parent, choice = parent[keep], choice[keep]
        # Cost ascending, quality descending, then earlier parent and earlier option.
        order = np.lexsort((choice, parent, -new_quality, new_cost))
        new_cost, new_quality = new_cost[order], new_quality[order]
        parent, choice = parent[order], choice[order]
        best_before = np.concatenate(([-np.inf], np.maximum.accumulate(new_quality)[:-1]))
        pareto = new_quality > best_before + quality_tolerance
        cost, quality = new_cost[pareto], new_quality[pareto]
        layers.append(_Layer(parent[pareto], option[choice[pareto]]))
    return cost, quality, layers


def _assignment(table: ScoreTable, layers: list[_Layer], index: int) -> dict[str, str]:
    chosen: list[int] = []
    for layer in reversed(layers):
        chosen.append(int(layer.expert[index]))
        index = int(layer.parent[index])
    chosen.reverse()
    return {c: table.experts[e] for c, e in zip(table.categories, chosen, strict=True)}


def minimum_cost_b(table: ScoreTable) -> float:
    """Average cost of the cheapest map over experts with a known size."""
    known = ~np.isnan(table.costs_b)
    if not known.any():
        raise ValueError(f"no expert has a known cost; experts: {list(table.experts)}")
    return float(table.frequencies @ np.full(len(table.categories), table.costs_b[known].min()))


def optimise_map(table: ScoreTable, budget_b: float) -> MapChoice:
    """The exact best map whose average active parameters stay within budget_b."""
    if not isinstance(budget_b, numbers.Real) or math.isnan(budget_b) or budget_b < 0:
        raise ValueError(f"budget_b must be a number >= 0, got {budget_b!r}")
    experts = _budgeted_experts(table)
    minimum = float(
        table.frequencies @ np.full(len(table.categories), table.costs_b[experts].min())
    )
    if minimum > budget_b * (1 + 1e-9):
        raise InfeasibleBudget(budget_b, minimum)
    options = _category_options(table, experts)
    cost, _quality, layers = _pareto_dp(table, options, float(budget_b))
    if cost.size == 0:  # only rounding can get here: the cheapest map was at the edge
        raise InfeasibleBudget(budget_b, minimum)
    # The frontier's quality rises with cost, so the last survivor is the best that fits.
    return map_choice(table, _assignment(table, layers, len(cost) - 1))


def quality_frontier(table: ScoreTable) -> list[MapChoice]:
    """Every Pareto-optimal map (no other is both cheaper and better), sorted by cost."""
    experts = _budgeted_experts(table)
    options = _category_options(table, experts)
    cost, _quality, layers = _pareto_dp(table, options, None)
    return [map_choice(table, _assignment(table, layers, i)) for i in range(len(cost))]
