from __future__ import annotations

import numpy as np
import pytest

from router.choose.mapping import CategoryMap
from router.classify.classifier import CentroidClassifier, KNNClassifier, softmax
from router.two_step import TwoStepRouter, few_shot_router
from tests.unit.fakes import KeywordEmbedder

EXAMPLES = {
    "math": ["sum of numbers", "integral and sum", "sum the series"],
    "code": ["python function", "write python code", "python class"],
    "writing": ["poem about rain", "a poem and a story", "story of a poem"],
}
EMBEDDER = KeywordEmbedder(["sum", "integral", "python", "code", "poem", "story"])
MAP = CategoryMap({"math": "mathy", "code": "coder", "writing": "poet"}, generalist="general")


@pytest.mark.parametrize("classifier", ["centroid", "knn"])
def test_routes_each_category_to_its_expert(classifier: str) -> None:
    router = few_shot_router(EMBEDDER, EXAMPLES, MAP, 0.5, classifier=classifier, knn_k=3)
    assert router.route("compute the sum").expert == "mathy"
    assert router.route("python please").expert == "coder"
    assert router.route("a poem").expert == "poet"


def test_low_confidence_goes_to_generalist() -> None:
    router = few_shot_router(EMBEDDER, EXAMPLES, MAP, 0.9)
    decision = router.route("nothing matches here")
    assert decision.fallback
    assert decision.expert == "general"
    assert decision.confidence < 0.9
    assert sum(decision.scores.values()) == pytest.approx(1.0, abs=1e-4)


def test_batch_matches_single_routes() -> None:
    router = few_shot_router(EMBEDDER, EXAMPLES, MAP, 0.5)
    prompts = ["sum it", "python", "poem", "hello"]
    assert router.route_batch(prompts) == [router.route(p) for p in prompts]
    assert router.route_batch([]) == []


def test_probabilities_are_calibrated_rows() -> None:
    vectors = EMBEDDER.embed([t for ts in EXAMPLES.values() for t in ts])
    labels = [c for c, ts in EXAMPLES.items() for _ in ts]
    for classifier in (
        CentroidClassifier(0.1).fit(vectors, labels),
        KNNClassifier(3).fit(vectors, labels),
    ):
        probabilities = classifier.predict_proba(EMBEDDER.embed(["sum", "poem", "x"]))
        assert probabilities.shape == (3, 3)
        assert np.allclose(probabilities.sum(axis=1), 1.0)
        assert (probabilities >= 0).all()


def test_classifier_rejects_bad_training_data() -> None:
    with pytest.raises(ValueError, match="one label per vector"):
        CentroidClassifier().fit(np.zeros((2, 3)), ["a"])
    with pytest.raises(ValueError, match="temperature"):
        CentroidClassifier(temperature=0)
    with pytest.raises(ValueError, match="k must be"):
        KNNClassifier(k=0)
    with pytest.raises(RuntimeError, match="before fit"):
        CentroidClassifier().predict_proba(np.zeros((1, 3)))


def test_softmax_temperature_sharpens() -> None:
    logits = np.array([[0.5, 0.4]])
    assert softmax(logits, 0.01)[0, 0] > softmax(logits, 1.0)[0, 0] > 0.5


def test_map_and_router_validation() -> None:
    with pytest.raises(ValueError, match="generalist"):
        CategoryMap({"a": "x"}, generalist="y", experts=frozenset({"x"}))
    with pytest.raises(ValueError, match="unknown expert"):
        CategoryMap({"a": "ghost"}, generalist="x", experts=frozenset({"x"}))
    classifier = CentroidClassifier().fit(EMBEDDER.embed(["sum", "poem"]), ["math", "writing"])
    partial = CategoryMap({"math": "mathy"}, generalist="mathy")
    with pytest.raises(ValueError, match="without an expert"):
        TwoStepRouter(EMBEDDER, classifier, partial, 0.5)
    with pytest.raises(ValueError, match="confidence_threshold"):
        TwoStepRouter(EMBEDDER, classifier, MAP, 1.5)
    with pytest.raises(ValueError, match="unknown classifier"):
        few_shot_router(EMBEDDER, EXAMPLES, MAP, 0.5, classifier="svm")
