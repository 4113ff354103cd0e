"""Hard and soft expert choice from category probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from router.choose.expert_choice import HardRouting, SoftRouting, choose_experts
from router.choose.score_table import ScoreTable

CATEGORIES = ["math", "code"]
# "mathy" is great at math only, "coder" at code only, "allround" good at both, dearer.
TABLE = ScoreTable(
    categories=("math", "code"),
    experts=("mathy", "coder", "allround", "closed"),
    scores=np.array([[0.9, 0.2, 0.7, 0.95], [0.2, 0.9, 0.7, 0.95]]),
    costs_b=np.array([7.0, 7.0, 30.0, np.nan]),
    frequencies=np.array([0.5, 0.5]),
)
OPEN = ("mathy", "coder", "allround")
HARD = HardRouting({"math": "mathy", "code": "coder"}, "allround", 0.0)


def test_hard_routing_takes_the_top_category() -> None:
    rows = np.array([[0.8, 0.2], [0.3, 0.7], [0.55, 0.45]])
    experts, fallback = choose_experts(rows, CATEGORIES, HARD)
    assert experts == ["mathy", "coder", "mathy"]
    assert fallback.tolist() == [False, False, False]


def test_hard_routing_falls_back_below_threshold() -> None:
    routing = HardRouting({"math": "mathy", "code": "coder"}, "allround", 0.6)
    experts, fallback = choose_experts(np.array([[0.8, 0.2], [0.55, 0.45]]), CATEGORIES, routing)
    assert experts == ["mathy", "allround"]
    assert fallback.tolist() == [False, True]


def test_soft_routing_prefers_the_all_rounder_when_unsure() -> None:
    routing = SoftRouting(TABLE, 0.0, "allround", allowed_experts=OPEN)
    rows = np.array([[1.0, 0.0], [0.55, 0.45], [0.1, 0.9]])
    experts, fallback = choose_experts(rows, CATEGORIES, routing)
    # 0.55*0.9 + 0.45*0.2 = 0.585 < 0.7: the all-rounder wins the unsure row.
    assert experts == ["mathy", "allround", "coder"]
    assert not fallback.any()
    hard_experts, _ = choose_experts(rows, CATEGORIES, HARD)
    assert hard_experts == ["mathy", "mathy", "coder"]


def test_soft_routing_cost_weight_trades_quality_for_size() -> None:
    row = np.array([[0.55, 0.45]])
    # Gap 0.7 - 0.585 = 0.115 over 23B more: a price above 0.115/23 per B flips it.
    cheap = SoftRouting(TABLE, 0.006, "allround", allowed_experts=OPEN)
    dear = SoftRouting(TABLE, 0.004, "allround", allowed_experts=OPEN)
    assert choose_experts(row, CATEGORIES, cheap)[0] == ["mathy"]
    assert choose_experts(row, CATEGORIES, dear)[0] == ["allround"]


def test_soft_routing_with_one_hot_rows_matches_the_per_category_best() -> None:
    routing = SoftRouting(TABLE, 0.0, "allround", allowed_experts=OPEN)
    experts, _ = choose_experts(np.eye(2), CATEGORIES, routing)
    assert experts == ["mathy", "coder"]


def test_soft_routing_falls_back_below_threshold() -> None:
    routing = SoftRouting(TABLE, 0.0, "coder", confidence_threshold=0.6, allowed_experts=OPEN)
    experts, fallback = choose_experts(np.array([[0.9, 0.1], [0.5, 0.5]]), CATEGORIES, routing)
    assert experts == ["mathy", "coder"]
    assert fallback.tolist() == [False, True]


def test_soft_routing_columns_follow_the_classifier_order() -> None:
    routing = SoftRouting(TABLE, 0.0, "allround", allowed_experts=OPEN)
    experts, _ = choose_experts(np.array([[0.0, 1.0]]), ["code", "math"], routing)
    assert experts == ["mathy"]


def test_soft_ties_go_to_the_cheaper_expert() -> None:
    table = ScoreTable(
        ("a",), ("big", "small"), np.array([[0.5, 0.5]]), np.array([9.0, 1.0]), np.array([1.0])
    )
    experts, _ = choose_experts(np.array([[1.0]]), ["a"], SoftRouting(table, 0.0, "big"))
    assert experts == ["small"]


def test_unknown_cost_experts_are_left_out_of_priced_soft_routing() -> None:
    with pytest.warns(UserWarning, match=r"left out of soft routing: \['closed'\]"):
        routing = SoftRouting(TABLE, 0.001, "allround")
    assert "closed" not in choose_experts(np.array([[0.5, 0.5]]), CATEGORIES, routing)[0]
    # Unpriced, the closed model can be chosen: it scores best everywhere.
    free = SoftRouting(TABLE, 0.0, "allround")
    assert choose_experts(np.array([[0.5, 0.5]]), CATEGORIES, free)[0] == ["closed"]
    with pytest.raises(ValueError, match="'closed' has no known size"):
        SoftRouting(TABLE, 0.1, "allround", allowed_experts=("closed", "mathy"))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: HardRouting({}, "g", 1.5), "confidence_threshold"),
        (lambda: HardRouting({}, "", 0.5), "generalist"),
        (lambda: SoftRouting(TABLE, -1.0, "g"), "cost_weight"),
        (lambda: SoftRouting(TABLE, float("inf"), "g"), "cost_weight"),
        (lambda: SoftRouting(TABLE, 0.0, "g", 2.0), "confidence_threshold"),
        (lambda: SoftRouting(TABLE, 0.0, "g", allowed_experts=()), "empty"),
        (lambda: SoftRouting(TABLE, 0.0, "g", allowed_experts=("ghost",)), "ghost"),
    ],
)
def test_bad_routing_settings(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("rows", "categories", "message"),
    [
        (np.array([0.5, 0.5]), CATEGORIES, "shape"),
        (np.array([[0.5, 0.5]]), ["math"], "shape"),
        (np.array([[np.nan, 1.0]]), CATEGORIES, "NaN"),
        (np.array([[2.0, 3.0]]), CATEGORIES, "sum to 1"),
        (np.array([[1.5, -0.5]]), CATEGORIES, "sum to 1"),
    ],
)
def test_bad_probabilities(rows: np.ndarray, categories: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_experts(rows, categories, HARD)


def test_unmapped_or_unscored_categories_are_named() -> None:
    rows = np.array([[0.5, 0.5]])
    with pytest.raises(ValueError, match=r"without an expert in the map: \['code'\]"):
        choose_experts(rows, CATEGORIES, HardRouting({"math": "mathy"}, "g", 0.0))
    with pytest.raises(ValueError, match="'poetry' has no scores"):
        choose_experts(rows, ["math", "poetry"], SoftRouting(TABLE, 0.0, "g"))
    with pytest.raises(TypeError, match="HardRouting or SoftRouting"):
        choose_experts(rows, CATEGORIES, "hard")  # type: ignore[arg-type]


def test_empty_batch() -> None:
    experts, fallback = choose_experts(np.zeros((0, 2)), CATEGORIES, HARD)
    assert experts == [] and fallback.shape == (0,)
