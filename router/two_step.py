"""The two-step router: embed -> classify into a category -> map to an expert."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from router.classifier import CategoryClassifier, CentroidClassifier, KNNClassifier
from router.embedder import Embedder
from router.mapping import CategoryMap


@dataclass(frozen=True)
class RouteDecision:
    """Where one prompt goes and why."""

    expert: str
    category: str
    confidence: float
    fallback: bool  # True when confidence was below threshold and the generalist took it
    scores: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TwoStepRouter:
    """Routes prompts; one method, as routers should be."""

    def __init__(
        self,
        embedder: Embedder,
        classifier: CategoryClassifier,
        category_map: CategoryMap,
        confidence_threshold: float,
    ) -> None:
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
        missing = [c for c in classifier.categories if c not in category_map.experts_by_category]
        if missing:
            raise ValueError(f"categories without an expert: {missing}")
        self.embedder = embedder
        self.classifier = classifier
        self.category_map = category_map
        self.confidence_threshold = confidence_threshold

    def route_batch(self, prompts: list[str]) -> list[RouteDecision]:
        if not prompts:
            return []
        probabilities = self.classifier.predict_proba(self.embedder.embed(prompts))
        return [self._decide(row) for row in probabilities]

    def route(self, prompt: str) -> RouteDecision:
        return self.route_batch([prompt])[0]

    def _decide(self, probabilities: np.ndarray) -> RouteDecision:
        categories = self.classifier.categories
        best = int(np.argmax(probabilities))
        confidence = float(probabilities[best])
        fallback = confidence < self.confidence_threshold
        expert = (
            self.category_map.generalist
            if fallback
            else self.category_map.expert_for(categories[best])
        )
        return RouteDecision(
            expert=expert,
            category=categories[best],
            confidence=confidence,
            fallback=fallback,
            scores={c: round(float(p), 6) for c, p in zip(categories, probabilities, strict=True)},
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
