from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import router.training.category_evidence as evidence
from router.training.category_evidence import (
    class_label,
    class_predictions,
    neighbour_indexes,
    parent,
)
from tests.unit.fakes import KeywordEmbedder

EMBEDDER = KeywordEmbedder(["sum", "integral", "contract", "tort"])
TEXTS = [f"the sum and integral number {i}" for i in range(8)] + [
    f"a contract and a tort case {i}" for i in range(8)
]
LABELS = ["math"] * 8 + ["law"] * 8
TEST_TEXTS = ["an integral sum", "a tort in contract"]


def test_subcategory_labels_map_back_to_their_category() -> None:
    assert class_label("physics", "stemez-Optics", subcategories=False) == "physics"
    label = class_label("physics", "ori_mmlu-college_physics", subcategories=True)
    assert label == "physics/mmlu" and parent(label) == "physics"
    assert parent(class_label("math", "theoremQA-Math", subcategories=True)) == "math"


def test_class_predictions_are_cached_by_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors, test_vectors = EMBEDDER.embed(TEXTS), EMBEDDER.embed(TEST_TEXTS)
    arguments = ("logreg", 3, 0, TEXTS, vectors, LABELS, TEST_TEXTS, test_vectors, tmp_path)
    first, cached = class_predictions(*arguments)
    assert not cached and first.classes == ["law", "math"]
    assert first.validation_log_p.shape == (16, 2) and len(np.unique(first.fold_of)) == 3
    assert first.test_log_p.argmax(axis=1).tolist() == [1, 0]

    def no_refit(*_: object) -> None:
        raise AssertionError("a cached prediction must not refit the classifier")

    monkeypatch.setattr(evidence, "fit_predict", no_refit)
    again, cached = class_predictions(*arguments)
    assert cached and np.array_equal(again.validation_log_p, first.validation_log_p)
    # Different labels are a different key: the classifier would be refitted.
    with pytest.raises(AssertionError, match="must not refit"):
        class_predictions(*arguments[:5], ["law"] * 8 + ["math"] * 8, *arguments[6:])


def test_folds_never_outnumber_the_rarest_class(tmp_path: Path) -> None:
    labels = ["math"] * 14 + ["law"] * 2
    vectors, test_vectors = EMBEDDER.embed(TEXTS), EMBEDDER.embed(TEST_TEXTS)
    result, _ = class_predictions(
        "logreg", 5, 0, TEXTS, vectors, labels, TEST_TEXTS, test_vectors, None
    )
    assert len(np.unique(result.fold_of)) == 2


def test_neighbour_indexes_find_same_topic_prompts_and_skip_themselves() -> None:
    vectors, test_vectors = EMBEDDER.embed(TEXTS), EMBEDDER.embed(TEST_TEXTS)
    train_indexes, test_indexes = neighbour_indexes(
        TEXTS, vectors, TEST_TEXTS, test_vectors, depth=3
    )
    assert len(train_indexes) == len(test_indexes) == 2  # by embedding, by TF-IDF
    labels = np.array(LABELS)
    for index in train_indexes:
        assert index.indices.shape == (16, 3)
        assert not np.any(index.indices == np.arange(16)[:, None])
        assert np.all(labels[index.indices[:, 0]] == labels)
    for index in test_indexes:
        assert labels[index.indices[0, 0]] == "math" and labels[index.indices[1, 0]] == "law"
