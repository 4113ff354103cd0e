"""TwoStepRouter's routing modes, text-aware classifiers, and map extension."""

from __future__ import annotations

import numpy as np
import pytest

from router.choose.mapping import CategoryMap
from router.choose.score_table import ScoreTable
from router.classify.classifier import CentroidClassifier
from router.two_step import TextCategoryClassifier, TwoStepRouter
from tests.unit.fakes import KeywordEmbedder

EMBEDDER = KeywordEmbedder(["sum", "python", "poem"])
CLASSIFIER = CentroidClassifier(0.5).fit(
    EMBEDDER.embed(["sum", "python", "poem"]), ["math", "code", "writing"]
)
MAP = CategoryMap(
    {"math": "mathy", "code": "coder", "writing": "poet"},
    generalist="general",
    experts=frozenset({"mathy", "coder", "poet", "general", "undeployed-peer"}),
)
TABLE = ScoreTable(
    categories=("code", "math", "writing"),
    experts=("mathy", "coder", "poet", "general", "not-deployed"),
    scores=np.array(
        [
            [0.2, 0.9, 0.1, 0.6, 1.0],
            [0.9, 0.2, 0.1, 0.6, 1.0],
            [0.1, 0.1, 0.9, 0.6, 1.0],
        ]
    ),
    costs_b=np.array([7.0, 7.0, 7.0, 20.0, 1.0]),
    frequencies=np.array([0.4, 0.4, 0.2]),
)


def test_hard_mode_is_the_default_and_unchanged() -> None:
    router = TwoStepRouter(EMBEDDER, CLASSIFIER, MAP, 0.0)
    assert router.mode == "hard"
    decision = router.route("sum sum")
    assert (decision.expert, decision.category, decision.fallback) == ("mathy", "math", False)
    assert decision.expected_quality is None
    assert sum(decision.scores.values()) == pytest.approx(1.0, abs=1e-4)


def test_soft_mode_sends_mixed_prompts_to_the_all_rounder() -> None:
    soft = TwoStepRouter(EMBEDDER, CLASSIFIER, MAP, 0.0, mode="soft", score_table=TABLE)
    hard = TwoStepRouter(EMBEDDER, CLASSIFIER, MAP, 0.0, score_table=TABLE)
    prompts = ["sum sum sum", "sum with python", "poem"]
    soft_decisions = soft.route_batch(prompts)
    assert [d.expert for d in soft_decisions] == ["mathy", "general", "poet"]
    assert [d.expert for d in hard.route_batch(prompts)][::2] == ["mathy", "poet"]
    # The undeployed expert scores best everywhere but is never chosen.
    assert all(d.expert != "not-deployed" for d in soft_decisions)
    mixed = soft_decisions[1]
    expected = sum(mixed.scores[c] * 0.6 for c in ("code", "math", "writing"))
    assert mixed.expected_quality == pytest.approx(expected, abs=1e-4)
    assert soft.route_batch(prompts) == [soft.route(p) for p in prompts]


def test_soft_mode_prices_active_parameters_and_falls_back() -> None:
    priced = TwoStepRouter(
        EMBEDDER, CLASSIFIER, MAP, 0.0, mode="soft", score_table=TABLE, cost_weight=1.0
    )
    assert priced.route("sum with python").expert != "general"  # 20B is too dear now
    unsure = TwoStepRouter(EMBEDDER, CLASSIFIER, MAP, 0.99, mode="soft", score_table=TABLE)
    decision = unsure.route("sum with python")
    assert decision.fallback and decision.expert == "general"


def test_soft_mode_needs_a_matching_score_table() -> None:
    with pytest.raises(ValueError, match="needs a score_table"):
        TwoStepRouter(EMBEDDER, CLASSIFIER, MAP, 0.0, mode="soft")
    partial = ScoreTable(("math",), ("mathy",), np.array([[0.9]]), np.array([7.0]), np.ones(1))
    with pytest.raises(
        ValueError, match=r"without scores in the score table: \['code', 'writing'\]"
    ):
        TwoStepRouter(EMBEDDER, CLASSIFIER, MAP, 0.0, mode="soft", score_table=partial)
    stranger = ScoreTable(
        ("code", "math", "writing"), ("other",), np.ones((3, 1)), np.array([1.0]), np.ones(3) / 3
    )
    with pytest.raises(ValueError, match="is deployed"):
        TwoStepRouter(EMBEDDER, CLASSIFIER, MAP, 0.0, mode="soft", score_table=stranger)
    with pytest.raises(ValueError, match="unknown routing mode 'fuzzy'"):
        TwoStepRouter(EMBEDDER, CLASSIFIER, MAP, 0.0, mode="fuzzy")  # type: ignore[arg-type]


class KeywordTextClassifier:
    """Needs the text: 'urgent' in a prompt forces the code category."""

    def __init__(self) -> None:
        self.categories = list(CLASSIFIER.categories)
        self.seen: list[list[str]] = []

    def predict_proba_texts(self, texts: list[str], vectors: np.ndarray) -> np.ndarray:
        self.seen.append(list(texts))
        rows = CLASSIFIER.predict_proba(vectors)
        for row, text in enumerate(texts):
            if "urgent" in text:
                rows[row] = [float(c == "code") for c in self.categories]
        return rows


def test_text_classifiers_get_the_prompts() -> None:
    classifier = KeywordTextClassifier()
    assert isinstance(classifier, TextCategoryClassifier)
    router = TwoStepRouter(EMBEDDER, classifier, MAP, 0.0)
    decisions = router.route_batch(["sum sum urgent", "sum sum"])
    assert [d.expert for d in decisions] == ["coder", "mathy"]
    assert classifier.seen == [["sum sum urgent", "sum sum"]]


def test_category_map_extension() -> None:
    extended = MAP.with_category("poetry", "poet")
    assert extended.expert_for("poetry") == "poet"
    assert extended.experts == MAP.experts
    assert "poetry" not in MAP.experts_by_category
    with pytest.raises(ValueError, match="unknown expert 'ghost'"):
        MAP.with_category("x", "ghost")
    built = CategoryMap.from_assignment({"math": "mathy"}, "general")
    assert built.experts == frozenset({"mathy", "general"})
