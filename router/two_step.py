"""The two-step router: embed -> classify into a category -> map to an expert.

The second step runs in one of two modes (see router.choose.expert_choice): "hard" sends the most
probable category to its mapped expert; "soft" weighs every expert's scores by the
whole category distribution, minus a price on active parameters. Both fall back to
the generalist below the confidence threshold.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import numpy as np

from router.choose.expert_choice import HardRouting, SoftRouting, choose_experts
from router.choose.mapping import CategoryMap
from router.choose.score_table import ScoreTable
from router.classify.classifier import CategoryClassifier, CentroidClassifier, KNNClassifier
from router.decision import RouteDecision
from router.embed.protocol import Embedder

RoutingMode = Literal["hard", "soft"]
ROUTING_MODES: tuple[RoutingMode, ...] = ("hard", "soft")


@runtime_checkable
class TextCategoryClassifier(Protocol):
    """A classifier that reads the prompt text as well as its embedding."""

    categories: list[str]

    def predict_proba_texts(self, texts: list[str], vectors: np.ndarray) -> np.ndarray: ...


class TwoStepRouter:
    """Routes prompts; one method, as routers should be."""

    def __init__(
        self,
        embedder: Embedder,
        classifier: CategoryClassifier | TextCategoryClassifier,
        category_map: CategoryMap,
        confidence_threshold: float,
        *,
        mode: RoutingMode = "hard",
        score_table: ScoreTable | None = None,
        cost_weight: float = 0.0,
    ) -> None:
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
        if mode not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode {mode!r}; expected one of {ROUTING_MODES}")
        categories = list(classifier.categories)
        self.routing: HardRouting | SoftRouting
        if mode == "hard":
            missing = [c for c in categories if c not in category_map.experts_by_category]
            if missing:
                raise ValueError(f"categories without an expert: {missing}")
            self.routing = HardRouting(
                category_map.experts_by_category, category_map.generalist, confidence_threshold
            )
        else:
            self.routing = _soft_routing(
                categories, category_map, confidence_threshold, score_table, cost_weight
            )
        self.embedder = embedder
        self.classifier = classifier
        self.category_map = category_map
        self.confidence_threshold = confidence_threshold
        self.mode: RoutingMode = mode
        self.score_table = score_table
        self._table_rows = (
            None
            if score_table is None or any(c not in score_table.categories for c in categories)
            else np.array([score_table.category_index(c) for c in categories], dtype=np.int64)
        )
        # Made once, not per request: they cost more than the arithmetic on the route path.
        self._reads_text = isinstance(classifier, TextCategoryClassifier)
        self._quality_scores = (
            None
            if score_table is None or self._table_rows is None
            else score_table.scores[self._table_rows]  # (categories, experts), classifier order
        )
        self._expert_column = (
            {} if score_table is None else {e: i for i, e in enumerate(score_table.experts)}
        )

    def probabilities(self, prompts: list[str]) -> np.ndarray:
        """p(category | prompt), one row per prompt, columns = classifier.categories."""
        if len(self.classifier.categories) == 1:
            # A distribution over one category is 1 for any classifier: skip the
            # embedder, which then never has to load (see router.embedder.LazyEmbedder).
            return np.ones((len(prompts), 1))
        vectors = self.embedder.embed(prompts)
        if self._reads_text:
            return self.classifier.predict_proba_texts(prompts, vectors)  # type: ignore[union-attr]
        return self.classifier.predict_proba(vectors)  # type: ignore[union-attr]

    def route_batch(self, prompts: list[str]) -> list[RouteDecision]:
        if not prompts:
            return []
        probabilities = np.asarray(self.probabilities(prompts), dtype=np.float64)
        categories = list(self.classifier.categories)
        experts, fallback = choose_experts(probabilities, categories, self.routing)
        best = np.argmax(probabilities, axis=1)
        confidence = probabilities[np.arange(len(prompts)), best]
        quality = self._expected_quality(probabilities, experts)
        return [
            RouteDecision(
                expert=experts[row],
                category=categories[best[row]],
                confidence=float(confidence[row]),
                fallback=bool(fallback[row]),
                scores={
                    c: round(float(p), 6)
                    for c, p in zip(categories, probabilities[row], strict=True)
                },
                expected_quality=None if quality is None else quality[row],
            )
            for row in range(len(prompts))
        ]

    def route(self, prompt: str) -> RouteDecision:
        return self.route_batch([prompt])[0]

    def _expected_quality(
        self, probabilities: np.ndarray, experts: list[str]
    ) -> list[float | None] | None:
        scores, known = self._quality_scores, self._expert_column
        if scores is None:
            return None
        return [
            round(float(p @ scores[:, known[e]]), 6) if e in known else None
            for p, e in zip(probabilities, experts, strict=True)
        ]


def _soft_routing(
    categories: list[str],
    category_map: CategoryMap,
    confidence_threshold: float,
    score_table: ScoreTable | None,
    cost_weight: float,
) -> SoftRouting:
    if score_table is None:
        raise ValueError("soft routing needs a score_table (category x expert scores)")
    unscored = [c for c in categories if c not in score_table.categories]
    if unscored:
        raise ValueError(f"categories without scores in the score table: {unscored}")
    # Only experts that are deployed can be chosen, and only priced ones when cost matters.
    allowed = tuple(
        e
        for e, cost in zip(score_table.experts, score_table.costs_b, strict=True)
        if e in category_map.experts and not (cost_weight > 0 and np.isnan(cost))
    )
    if not allowed:
        raise ValueError(
            f"no expert of the score table {list(score_table.experts)} is deployed "
            f"(deployed: {sorted(category_map.experts)}) with a known cost"
        )
    return SoftRouting(
        score_table, cost_weight, category_map.generalist, confidence_threshold, allowed
    )


def few_shot_router(
    embedder: Embedder,
    examples: dict[str, list[str]],
    category_map: CategoryMap,
    confidence_threshold: float,
    classifier: str = "centroid",
    temperature: float = 0.05,
    knn_k: int = 5,
) -> TwoStepRouter:
    """Fit a few-shot classifier on each category's example prompts and join the steps."""
    texts = [text for prompts in examples.values() for text in prompts]
    labels = [category for category, prompts in examples.items() for _ in prompts]
    vectors = embedder.embed(texts)
    fitted: CategoryClassifier
    if classifier == "centroid":
        fitted = CentroidClassifier(temperature).fit(vectors, labels)
    elif classifier == "knn":
        fitted = KNNClassifier(knn_k, temperature).fit(vectors, labels)
    else:
        raise ValueError(f"unknown classifier {classifier!r}; expected 'centroid' or 'knn'")
    return TwoStepRouter(embedder, fitted, category_map, confidence_threshold)
