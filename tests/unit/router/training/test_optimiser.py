"""The map optimiser: exact against brute force, budgets, the frontier, and bad input."""

from __future__ import annotations

import csv
import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, milp

from router.choose.score_table import ScoreTable, score_table_from_correctness
from router.training.optimiser import (
    InfeasibleBudget,
    map_choice,
    minimum_cost_b,
    optimise_map,
    quality_frontier,
)
from tests.conftest import PROJECT_ROOT

MMLU_PRO = PROJECT_ROOT.parent / "shared" / "data" / "mmlu_pro"


def table_of(scores: list[list[float]], costs: list[float], freqs: list[float]) -> ScoreTable:
    return ScoreTable(
        tuple(f"c{i}" for i in range(len(scores))),
        tuple(f"e{j}" for j in range(len(costs))),
        np.array(scores, dtype=np.float64),
        np.array(costs, dtype=np.float64),
        np.array(freqs, dtype=np.float64),
    )


@st.composite
def small_tables(draw: st.DrawFn) -> ScoreTable:
    """Scores in eighths, integer costs, frequencies in eighths: every sum is exact."""
    n_categories = draw(st.integers(1, 4))
    n_experts = draw(st.integers(1, 4))
    scores = [[draw(st.integers(0, 8)) / 8 for _ in range(n_experts)] for _ in range(n_categories)]
    costs = [float(draw(st.integers(0, 6))) for _ in range(n_experts)]
    counts = draw(st.lists(st.integers(0, 8), min_size=n_categories, max_size=n_categories))
    if sum(counts) == 0:
        counts[0] = 1
    total = sum(counts)
    counts = [c * 8 // total for c in counts]
    counts[int(np.argmax(counts))] += 8 - sum(counts)
    return table_of(scores, costs, [c / 8 for c in counts])


def every_map(table: ScoreTable) -> list[tuple[float, float]]:
    """(cost, quality) of every possible map, by brute force."""
    points = []
    for choice in itertools.product(range(len(table.experts)), repeat=len(table.categories)):
        columns = np.array(choice)
        rows = np.arange(len(table.categories))
        points.append(
            (
                float(table.frequencies @ table.costs_b[columns]),
                float(table.frequencies @ table.scores[rows, columns]),
            )
        )
    return points


def brute_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    frontier: list[tuple[float, float]] = []
    for cost, quality in sorted(points, key=lambda p: (p[0], -p[1])):
        if not frontier or quality > frontier[-1][1]:
            frontier.append((cost, quality))
    return frontier


@settings(max_examples=200, deadline=None)
@given(small_tables(), st.integers(0, 7))
def test_optimise_map_matches_brute_force(table: ScoreTable, budget: int) -> None:
    points = every_map(table)
    feasible = [q for c, q in points if c <= budget]
    if not feasible:
        with pytest.raises(InfeasibleBudget):
            optimise_map(table, budget)
        return
    choice = optimise_map(table, budget)
    assert choice.avg_active_params_b <= budget
    assert choice.expected_quality == pytest.approx(max(feasible), abs=1e-12)
    # Among the best maps the optimiser takes the cheapest.
    cheapest_best = min(c for c, q in points if c <= budget and q == max(feasible))
    assert choice.avg_active_params_b == pytest.approx(cheapest_best, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(small_tables())
def test_frontier_matches_brute_force(table: ScoreTable) -> None:
    frontier = quality_frontier(table)
    got = [(m.avg_active_params_b, m.expected_quality) for m in frontier]
    # Sums of eighths are exact in binary floating point, so equality is exact too.
    assert got == brute_frontier(every_map(table))


def random_table(seed: int, n_categories: int, n_experts: int) -> ScoreTable:
    rng = np.random.default_rng(seed)
    costs = rng.choice([0.5, 3.0, 7.0, 8.0, 14.0, 21.0, 47.0, 70.0, 141.0], n_experts)
    scores = np.clip(
        0.3 + 0.08 * np.log1p(costs)[None, :] + rng.normal(0, 0.08, (n_categories, n_experts)), 0, 1
    )
    return ScoreTable(
        tuple(f"c{i}" for i in range(n_categories)),
        tuple(f"e{j}" for j in range(n_experts)),
        scores,
        costs,
        rng.dirichlet(np.ones(n_categories)),
    )


def test_frontier_is_monotone_pareto_and_agrees_with_budgets() -> None:
    table = random_table(1, 14, 12)
    frontier = quality_frontier(table)
    costs = np.array([m.avg_active_params_b for m in frontier])
    qualities = np.array([m.expected_quality for m in frontier])
    assert len(frontier) > 5
    assert (np.diff(costs) > 0).all() and (np.diff(qualities) > 0).all()
    assert costs[0] == pytest.approx(minimum_cost_b(table))
    for point in frontier[:: max(1, len(frontier) // 10)]:
        best = optimise_map(table, point.avg_active_params_b)
        assert best.expected_quality == pytest.approx(point.expected_quality, abs=1e-12)
    for point in frontier:
        assert map_choice(table, point.assignment) == point


@pytest.mark.parametrize("budget", [5.0, 20.0, 35.0])
def test_never_worse_than_an_ilp_solver(budget: float) -> None:
    table = random_table(7, 30, 10)
    choice = optimise_map(table, budget)
    n_categories, n_experts = table.scores.shape
    weighted_cost = (table.frequencies[:, None] * table.costs_b[None, :]).ravel()
    result = milp(
        -(table.frequencies[:, None] * table.scores).ravel(),
        constraints=[
            LinearConstraint(np.kron(np.eye(n_categories), np.ones(n_experts)), 1, 1),
            LinearConstraint(weighted_cost[None, :], -np.inf, budget),
        ],
        integrality=np.ones(n_categories * n_experts),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    assert result.success
    assert choice.avg_active_params_b <= budget + 1e-9
    assert choice.expected_quality >= -result.fun - 1e-9


def test_ties_are_broken_deterministically_toward_the_cheaper_expert() -> None:
    table = table_of([[0.5, 0.5, 0.5], [0.25, 0.5, 0.5]], [9.0, 3.0, 3.0], [0.5, 0.5])
    choice = optimise_map(table, 100.0)
    assert choice.assignment == {"c0": "e1", "c1": "e1"}
    assert optimise_map(table, 100.0) == choice
    assert choice.experts_used == ("e1",)


def test_zero_frequency_category_gets_its_best_expert() -> None:
    table = table_of([[0.5, 0.25], [0.1, 0.9]], [1.0, 50.0], [1.0, 0.0])
    assert optimise_map(table, 1.0).assignment == {"c0": "e0", "c1": "e1"}


def test_infeasible_budget_names_budget_and_minimum() -> None:
    table = table_of([[0.5, 0.9]], [4.0, 8.0], [1.0])
    with pytest.raises(InfeasibleBudget, match=r"budget 3B.*cheapest map costs 4B") as error:
        optimise_map(table, 3.0)
    assert isinstance(error.value, ValueError)
    assert error.value.minimum_b == pytest.approx(4.0)
    assert optimise_map(table, 4.0).assignment == {"c0": "e0"}


def test_unknown_cost_experts_are_left_out_with_a_warning() -> None:
    table = table_of([[0.9, 0.5, 0.4], [0.9, 0.3, 0.6]], [float("nan"), 2.0, 3.0], [0.5, 0.5])
    with pytest.warns(UserWarning, match=r"left out of budgeted selection: \['e0'\]"):
        choice = optimise_map(table, 100.0)
    assert "e0" not in choice.experts_used
    with pytest.warns(UserWarning, match="e0"):
        assert all("e0" not in m.experts_used for m in quality_frontier(table))
    with (
        pytest.raises(ValueError, match="no expert has a known cost"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        optimise_map(table_of([[0.5]], [float("nan")], [1.0]), 10.0)


@pytest.mark.parametrize("budget", [-1.0, float("nan"), "10"])
def test_bad_budget_is_rejected(budget: object) -> None:
    table = table_of([[0.5]], [1.0], [1.0])
    with pytest.raises(ValueError, match="budget_b"):
        optimise_map(table, budget)  # type: ignore[arg-type]


def test_hundreds_of_categories_stay_exact_against_a_bound() -> None:
    table = random_table(3, 200, 26)
    choice = optimise_map(table, 12.0)
    assert choice.avg_active_params_b <= 12.0 + 1e-9
    # No map within budget can beat the per-category best, and ours fits.
    assert choice.expected_quality <= float(table.frequencies @ table.scores.max(axis=1))
    assert len(choice.assignment) == 200


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scores": np.zeros((2, 2))}, "scores has shape"),
        ({"scores": np.array([[np.nan, 0.1, 0.2]])}, "not finite"),
        ({"costs_b": np.array([1.0, -2.0, 3.0])}, "cost of expert 'b'"),
        ({"costs_b": np.array([1.0, 2.0])}, "costs_b has 2 entries"),
        ({"frequencies": np.array([0.5])}, "sum to 1"),
        ({"frequencies": np.array([1.0, 0.0])}, "frequencies has 2 entries"),
        ({"experts": ("a", "a", "c")}, "duplicate expert"),
        ({"categories": ()}, "at least one category"),
        ({"scores": "many"}, "numeric"),
    ],
)
def test_score_table_validation(change: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "categories": ("x",),
        "experts": ("a", "b", "c"),
        "scores": np.array([[0.1, 0.2, 0.3]]),
        "costs_b": np.array([1.0, 2.0, 3.0]),
        "frequencies": np.array([1.0]),
    }
    with pytest.raises(ValueError, match=message):
        ScoreTable(**{**fields, **change})  # type: ignore[arg-type]


def test_score_table_extension() -> None:
    table = table_of([[0.5, 0.25]], [1.0, 2.0], [1.0])
    wider = table.with_expert("e2", [0.9], 3.0)
    assert wider.experts == ("e0", "e1", "e2") and wider.scores[0, 2] == 0.9
    taller = wider.with_category("new", [0.1, 0.2, 0.8], 0.25)
    assert taller.frequencies.tolist() == [0.75, 0.25]
    assert optimise_map(taller, 100.0).assignment == {"c0": "e2", "new": "e2"}
    with pytest.raises(ValueError, match="already"):
        table.with_expert("e0", [0.1], 1.0)
    with pytest.raises(ValueError, match="needs 1 scores"):
        table.with_expert("e9", [0.1, 0.2], 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        table.with_category("more", [0.1, 0.2], 1.0)
    with pytest.raises(KeyError, match="unknown expert 'ghost'"):
        table.expert_index("ghost")


def test_score_table_from_correctness() -> None:
    labels = ["a", "a", "b", "a"]
    correctness = np.array([[1, 0], [1, np.nan], [0, 1], [0, 1]], dtype=np.float64)
    table = score_table_from_correctness(labels, correctness, ["m1", "m2"], [1.0, float("nan")])
    assert table.categories == ("a", "b")
    assert table.frequencies.tolist() == [0.75, 0.25]
    assert table.scores.tolist() == [[2 / 3, 1 / 3], [0.0, 1.0]]
    assert np.isnan(table.costs_b[1])
    # Shrinkage: two pseudo-questions at the expert's overall rate (m1: 0.5, m2: 0.5).
    shrunk = score_table_from_correctness(
        labels, correctness, ["m1", "m2"], [1.0, 2.0], prior_strength=2.0
    )
    assert shrunk.scores[1].tolist() == pytest.approx([(0 + 1.0) / 3, (1 + 1.0) / 3])
    # A listed category with no questions gets the overall rate and zero frequency.
    wide = score_table_from_correctness(
        labels, correctness, ["m1", "m2"], [1.0, 2.0], categories=["b", "a", "c"]
    )
    assert wide.categories == ("b", "a", "c")
    assert wide.frequencies.tolist() == [0.25, 0.75, 0.0]
    assert wide.scores[2].tolist() == [0.5, 0.5]


def test_score_table_from_correctness_rejects_bad_input() -> None:
    ok = np.ones((2, 2))
    with pytest.raises(ValueError, match="shape"):
        score_table_from_correctness(["a"], ok, ["m1", "m2"], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"not in \['a'\]: \['b'\]"):
        score_table_from_correctness(["a", "b"], ok, ["m1", "m2"], [1.0, 1.0], categories=["a"])
    with pytest.raises(ValueError, match="prior_strength"):
        score_table_from_correctness(["a", "b"], ok, ["m1", "m2"], [1.0, 1.0], prior_strength=-1)
    with pytest.raises(ValueError, match="at least one question"):
        score_table_from_correctness([], np.ones((0, 2)), ["m1", "m2"], [1.0, 1.0])


def test_real_mmlu_pro_maps_respect_budgets() -> None:
    if not (MMLU_PRO / "correctness.csv").exists():
        pytest.skip(f"MMLU-Pro data not found at {MMLU_PRO}")
    with (MMLU_PRO / "models.csv").open() as handle:
        sizes = {
            row["model"]: float(row["active_params_b"] or "nan") for row in csv.DictReader(handle)
        }
    with (MMLU_PRO / "correctness.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    models = [m for m in rows[0] if m not in ("question_id", "category", "src")]
    correctness = np.array([[float(r[m] or "nan") for m in models] for r in rows])
    table = score_table_from_correctness(
        [r["category"] for r in rows], correctness, models, [sizes[m] for m in models]
    )
    with pytest.warns(UserWarning, match="left out"):
        frontier = quality_frontier(table)
    singles = [
        (table.costs_b[j], float(table.frequencies @ table.scores[:, j]))
        for j in range(len(models))
        if not np.isnan(table.costs_b[j])
    ]
    for budget in (35.0, 50.0):
        with pytest.warns(UserWarning, match="left out"):
            choice = optimise_map(table, budget)
        assert choice.avg_active_params_b <= budget
        best_single = max(q for c, q in singles if c <= budget)
        assert choice.expected_quality >= best_single
        assert any(m.assignment == choice.assignment for m in frontier)
