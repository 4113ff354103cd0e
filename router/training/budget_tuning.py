"""Choosing a routing's settings on validation rows so its measured cost meets a budget.

Every routing mode has settings that trade quality for cost: the map on the quality
frontier (hard modes), the price per billion parameters (soft modes), and the
confidence threshold below which the generalist answers. They are chosen on
validation rows, i.e. training questions whose category probabilities came from a
classifier that did not see them, by measuring what the routing would have cost and
scored there; the best setting whose measured average cost fits the budget wins.

`tune_mode` measures with score tables built from all validation rows (the tables the
routing will use). `tune_cross_fitted_soft` is stricter: each fold's rows are routed
with a table built from the other folds, so the validation accuracy it reports is that
of questions whose correctness the table never saw, like the test questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router.choose.expert_choice import HardRouting, SoftRouting, choose_experts
from router.choose.score_table import ScoreTable
from router.training.cost_weight import fit_cost_weight
from router.training.mmlu_pro import MMLUProData
from router.training.optimiser import quality_frontier

THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5)
_BISECTION_STEPS = 60


def score_table(
    weights: np.ndarray, data: MMLUProData, classes: Sequence[str], experts: Sequence[str]
) -> ScoreTable:
    """Scores and frequencies from per-question class weights (one-hot or probabilities)."""
    columns = [data.experts.index(e) for e in experts]
    mass = weights.sum(axis=0)
    scores = (weights.T @ data.correctness[:, columns]) / np.maximum(mass, 1e-12)[:, None]
    costs = data.active_params_b[columns]
    return ScoreTable(tuple(classes), tuple(experts), scores, costs, mass / mass.sum())


def routed_outcome(data: MMLUProData, experts: Sequence[str]) -> tuple[float, float, float]:
    """(accuracy, mean active params, standard deviation of the active params) of a routing."""
    column_of = {e: i for i, e in enumerate(data.experts)}
    columns = np.fromiter((column_of[e] for e in experts), dtype=np.int64, count=len(experts))
    return _column_outcome(data, columns)


def _column_outcome(data: MMLUProData, columns: np.ndarray) -> tuple[float, float, float]:
    accuracy = float(data.correctness[np.arange(len(data)), columns].mean())
    costs = data.active_params_b[columns]
    return accuracy, float(costs.mean()), float(costs.std())


@dataclass(frozen=True)
class TunedRouting:
    routing: HardRouting | SoftRouting
    threshold: float
    validation_accuracy: float
    validation_cost_b: float
    validation_cost_std_b: float


def sized_experts(table: ScoreTable) -> tuple[str, ...]:
    return tuple(e for e, c in zip(table.experts, table.costs_b, strict=True) if not np.isnan(c))


def tune_mode(
    mode: str,
    budget_b: float,
    validation: MMLUProData,
    probabilities: np.ndarray,
    classes: list[str],
    tables: dict[str, ScoreTable],
    generalist: str,
) -> TunedRouting | None:
    """The best routing of `mode` (hard, hard-predicted, soft) whose measured cost fits."""
    best: TunedRouting | None = None
    for threshold in THRESHOLDS:
        candidate = _tune_one(
            mode, budget_b, validation, probabilities, classes, tables, generalist, threshold
        )
        if candidate and (best is None or candidate.validation_accuracy > best.validation_accuracy):
            best = candidate
    return best


def _tune_one(
    mode: str,
    budget_b: float,
    validation: MMLUProData,
    probabilities: np.ndarray,
    classes: list[str],
    tables: dict[str, ScoreTable],
    generalist: str,
    threshold: float,
) -> TunedRouting | None:
    def measured(routing: HardRouting | SoftRouting) -> TunedRouting:
        experts, _ = choose_experts(probabilities, classes, routing)
        return TunedRouting(routing, threshold, *routed_outcome(validation, experts))

    if mode == "soft":
        table = tables["soft"]
        try:
            fitted = fit_cost_weight(
                probabilities,
                classes,
                table,
                budget_b,
                generalist,
                threshold,
                allowed_experts=sized_experts(table),
            )
        except ValueError:  # InfeasibleBudget included: the fallback alone costs too much
            return None
        return measured(fitted.routing)
    table = tables["true" if mode == "hard" else "soft"]
    # What choose_experts does with a HardRouting, for every map at once: the most
    # probable class's expert, the generalist below the threshold.
    column_of = {e: i for i, e in enumerate(validation.experts)}
    top = np.asarray(probabilities).argmax(axis=1)
    unsure = np.asarray(probabilities).max(axis=1) < threshold
    fitting = None
    # The frontier is sorted by cost and its quality rises with cost: keep the last map
    # whose measured cost, fallbacks included, fits the budget.
    for choice in quality_frontier(table):
        by_class = np.array([column_of[choice.assignment[c]] for c in classes], dtype=np.int64)
        columns = np.where(unsure, column_of[generalist], by_class[top])
        outcome = _column_outcome(validation, columns)
        if outcome[1] <= budget_b:
            routing = HardRouting(choice.assignment, generalist, threshold)
            fitting = TunedRouting(routing, threshold, *outcome)
    return fitting


def cross_fitted_utilities(
    probabilities: np.ndarray, correctness: np.ndarray, fold_of: np.ndarray
) -> np.ndarray:
    """(N, E) expected correctness p(c|x) @ scores, each fold's scores from the other folds.

    The scores of a class are the probability-weighted mean correctness of the rows
    that may belong to it, so they absorb the router's confusion as the soft table does.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    correctness = np.asarray(correctness, dtype=np.float64)
    fold_of = np.asarray(fold_of, dtype=np.int64)
    if not (len(probabilities) == len(correctness) == len(fold_of)):
        raise ValueError(
            f"need one row each: {len(probabilities)} probabilities, "
            f"{len(correctness)} correctness rows, {len(fold_of)} fold numbers"
        )
    folds = np.unique(fold_of)
    if len(folds) < 2:
        raise ValueError(f"cross-fitting needs at least two folds, got {folds.tolist()}")
    utilities = np.zeros((len(probabilities), correctness.shape[1]))
    for fold in folds:
        held, kept = fold_of == fold, fold_of != fold
        mass = probabilities[kept].sum(axis=0)
        scores = (probabilities[kept].T @ correctness[kept]) / np.maximum(mass, 1e-12)[:, None]
        utilities[held] = probabilities[held] @ scores
    return utilities


def tune_cross_fitted_soft(
    budget_b: float,
    validation: MMLUProData,
    probabilities: np.ndarray,
    classes: list[str],
    table: ScoreTable,
    fold_of: np.ndarray,
    generalist: str,
    thresholds: Sequence[float] = THRESHOLDS,
) -> TunedRouting | None:
    """Soft routing with `table` whose price and threshold are chosen on cross-fitted rows.

    None when even the cheapest routing (fallbacks included) costs more than budget_b.
    """
    experts = sized_experts(table)
    columns = [validation.experts.index(e) for e in experts]
    costs = validation.active_params_b[columns]
    order = np.argsort(costs, kind="stable")  # ties go to the cheaper expert, as in SoftRouting
    utilities = cross_fitted_utilities(probabilities, validation.correctness[:, columns], fold_of)
    utilities, costs = utilities[:, order], costs[order]
    correct = validation.correctness[:, columns][:, order]
    general = validation.correctness[:, validation.experts.index(generalist)]
    general_cost = float(validation.active_params_b[validation.experts.index(generalist)])
    confidence = np.asarray(probabilities).max(axis=1)
    rows = np.arange(len(validation))

    def routed(weight: float, fallback: np.ndarray) -> tuple[float, float, float]:
        chosen = np.argmax(utilities - weight * costs[None, :], axis=1)
        spent = np.where(fallback, general_cost, costs[chosen])
        right = np.where(fallback, general, correct[rows, chosen])
        return float(right.mean()), float(spent.mean()), float(spent.std())

    spread = float(np.ptp(utilities)) + 1.0
    gaps = np.diff(np.unique(costs))
    ceiling = 2.0 * spread / float(gaps.min()) if gaps.size else 1.0
    best: TunedRouting | None = None
    for threshold in thresholds:
        fallback = confidence < threshold
        # The routed cost falls as the price rises: bisect for the smallest price that fits.
        weight, result = 0.0, routed(0.0, fallback)
        if result[1] > budget_b:
            low, weight, result = 0.0, ceiling, routed(ceiling, fallback)
            if result[1] > budget_b:
                continue  # the fallback (or the cheapest expert) alone costs too much
            for _ in range(_BISECTION_STEPS):
                middle = (low + weight) / 2
                attempt = routed(middle, fallback)
                if attempt[1] <= budget_b:
                    weight, result = middle, attempt
                else:
                    low = middle
        routing = SoftRouting(table, weight, generalist, threshold, allowed_experts=experts)
        candidate = TunedRouting(routing, threshold, *result)
        if best is None or candidate.validation_accuracy > best.validation_accuracy:
            best = candidate
    return best


def report_on_test(
    budget_b: float,
    target_b: float | None,
    tuned: TunedRouting | None,
    test: MMLUProData,
    test_probabilities: np.ndarray,
    classes: list[str],
) -> dict[str, Any]:
    """What a tuned routing gives on the test rows, next to what validation promised."""
    if tuned is None:
        return {"budget_b": budget_b, "feasible": False}
    experts, fallback = choose_experts(test_probabilities, classes, tuned.routing)
    accuracy, cost, _ = routed_outcome(test, experts)
    return {
        "budget_b": budget_b,
        "accuracy": accuracy,
        "avg_active_params_b": cost,
        "experts_used": sorted(set(experts)),
        "within_budget": cost <= budget_b,
        "fallback_rate": float(fallback.mean()),
        "confidence_threshold": tuned.threshold,
        "cost_target_b": None if target_b is None else float(target_b),
        "validation_accuracy": tuned.validation_accuracy,
        "validation_avg_active_params_b": tuned.validation_cost_b,
        **(
            {"cost_weight": tuned.routing.cost_weight}
            if isinstance(tuned.routing, SoftRouting)
            else {}
        ),
    }


def oracle_accuracy(
    budget_b: float | None,
    table: ScoreTable,
    test: MMLUProData,
    test_labels: Sequence[str],
    generalist: str,
) -> float:
    """Accuracy with perfect (true) labels and the best map from `table` within the budget.

    NaN when no map fits; a label the table lacks goes to the generalist.
    """
    frontier = quality_frontier(table)
    fitting = [c for c in frontier if budget_b is None or c.avg_active_params_b <= budget_b]
    if not fitting:
        return float("nan")
    assignment = fitting[-1].assignment
    experts = [assignment.get(label, generalist) for label in test_labels]
    return routed_outcome(test, experts)[0]
