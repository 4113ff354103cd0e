"""The router a config builds: few-shot or trained, extended live, hard or soft."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cluster.config import ConfigError, parse_config
from cluster.setup_steps import build_router
from router.classify.classifier import make_classifier
from tests.unit.fakes import KeywordEmbedder

EMBEDDER = KeywordEmbedder(["sum", "integral", "python", "code", "poem", "story", "atom"])


def config_data(**router: Any) -> dict[str, Any]:
    return {
        "experts": [
            {"name": n, "checkpoint": "/ckpt", "params_b": b}
            for n, b in (("general", 1.0), ("mathy", 7.0), ("coder", 7.0), ("poet", 2.0))
        ],
        "categories": [
            {"name": "math", "examples": ["sum of numbers", "integral"]},
            {"name": "code", "examples": ["python code", "code review"]},
        ],
        "category_map": {"math": "mathy", "code": "coder"},
        "generalist": "general",
        "router": {"confidence_threshold": 0.0, **router},
    }


def trained_artifact(tmp_path: Path) -> Path:
    texts = ["sum", "integral sum", "sum it", "python", "code", "python code"]
    labels = ["math"] * 3 + ["code"] * 3
    classifier = make_classifier("logreg").fit(EMBEDDER.embed(texts), labels)
    classifier.save(tmp_path / "router")
    return tmp_path / "router"


@pytest.mark.parametrize("kind", ["centroid", "knn"])
def test_few_shot_from_the_config_examples(kind: str) -> None:
    router = build_router(parse_config(config_data(classifier=kind, knn_k=1)), EMBEDDER)
    assert router.route("an integral").expert == "mathy"
    assert router.route("python please").expert == "coder"


def test_trained_classifier_learns_a_new_category_from_examples(tmp_path: Path) -> None:
    data = config_data(classifier="trained", artifact=str(trained_artifact(tmp_path)))
    data["categories"] = [
        {"name": "math"},
        {"name": "code"},
        {"name": "writing", "examples": ["a poem", "a story", "poem and story"]},
    ]
    data["category_map"]["writing"] = "poet"
    router = build_router(parse_config(data), EMBEDDER)
    assert router.classifier.categories == ["code", "math", "writing"]
    assert router.route("write a poem").expert == "poet"
    assert router.route("sum these").expert == "mathy"


def test_trained_classifier_needs_examples_for_a_category_it_does_not_know(
    tmp_path: Path,
) -> None:
    data = config_data(classifier="trained", artifact=str(trained_artifact(tmp_path)))
    data["categories"] = [{"name": "math"}, {"name": "code"}, {"name": "writing"}]
    data["category_map"]["writing"] = "poet"
    with pytest.raises(ConfigError, match="'writing' is new to the classifier"):
        build_router(parse_config(data), EMBEDDER)


def test_trained_categories_missing_from_the_config_are_named(tmp_path: Path) -> None:
    data = config_data(classifier="trained", artifact=str(trained_artifact(tmp_path)))
    data["categories"] = [{"name": "math"}]
    data["category_map"] = {"math": "mathy"}
    with pytest.raises(ConfigError, match=r"\['code'\]"):
        build_router(parse_config(data), EMBEDDER)


def test_missing_artifact_is_a_config_error(tmp_path: Path) -> None:
    data = config_data(classifier="trained", artifact=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"router\.artifact"):
        build_router(parse_config(data), EMBEDDER)


def test_soft_routing_prices_parameters() -> None:
    scores = {
        "math": {"mathy": 0.9, "general": 0.85, "coder": 0.2, "poet": 0.1},
        "code": {"coder": 0.9, "general": 0.5, "mathy": 0.3, "poet": 0.1},
    }
    cheap = config_data(routing="soft", cost_weight=0.0)
    cheap["expert_scores"] = scores
    assert build_router(parse_config(cheap), EMBEDDER).route("integral").expert == "mathy"
    # At 0.02 per billion, mathy's extra 6B cost more than its 0.05 quality edge.
    priced = config_data(routing="soft", cost_weight=0.02)
    priced["expert_scores"] = scores
    decision = build_router(parse_config(priced), EMBEDDER).route("integral")
    assert decision.expert == "general"
    assert decision.expected_quality is not None


@pytest.mark.parametrize("votes", [False, True], ids=["text-logreg", "text-logreg+votes"])
def test_text_classifier_artifact_learns_a_new_category(tmp_path: Path, votes: bool) -> None:
    from router.classify.features import TextClassifier
    from router.classify.vote_classifier import NeighbourVoteClassifier
    from router.training.vote_fit import fit_neighbour_vote_classifier

    texts = ["sum", "integral sum", "sum it", "python", "code", "python code"]
    labels = ["math"] * 3 + ["code"] * 3
    vectors = EMBEDDER.embed(texts)
    trained = (
        fit_neighbour_vote_classifier(texts, vectors, labels)
        if votes
        else TextClassifier(min_df=1).fit(texts, vectors, labels)
    )
    trained.save(tmp_path / "text")
    data = config_data(classifier="trained", artifact=str(tmp_path / "text"))
    data["categories"] = [
        {"name": "math"},
        {"name": "code"},
        {"name": "writing", "examples": ["a poem", "a story", "poem and story"]},
    ]
    data["category_map"]["writing"] = "poet"
    router = build_router(parse_config(data), EMBEDDER)
    assert isinstance(router.classifier, NeighbourVoteClassifier) == votes
    assert router.route("write a poem and a story").expert == "poet"
    assert router.route("python code please").expert == "coder"


def test_one_category_routes_without_ever_loading_the_embedder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from router.embed import embedder as embedder_module

    def no_model(name: str) -> Any:
        raise AssertionError(f"embedder {name!r} was loaded")

    monkeypatch.setattr(embedder_module, "make_embedder", no_model)
    data = config_data()
    data["categories"] = [{"name": "math", "examples": ["sum of numbers"]}]
    data["category_map"] = {"math": "mathy"}
    built = build_router(parse_config(data))  # the config's own (lazy) embedder
    decisions = built.route_batch(["anything at all", "write a poem"])
    assert [(d.expert, d.category, d.confidence) for d in decisions] == [("mathy", "math", 1.0)] * 2
    assert not built.embedder.loaded  # type: ignore[attr-defined]


def test_lazy_embedder_loads_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from router.embed import embedder as embedder_module
    from router.embed.embedder import LazyEmbedder

    made: list[str] = []

    def make(name: str) -> KeywordEmbedder:
        made.append(name)
        return EMBEDDER

    monkeypatch.setattr(embedder_module, "make_embedder", make)
    lazy = LazyEmbedder("all-MiniLM-L6-v2")
    assert made == [] and not lazy.loaded
    assert lazy.embed(["python code"]).shape == (1, EMBEDDER.dimension)
    assert lazy.dimension == EMBEDDER.dimension
    assert made == ["all-MiniLM-L6-v2"]
    with pytest.raises(ValueError, match="unknown embedder 'word2vec'"):
        LazyEmbedder("word2vec")
