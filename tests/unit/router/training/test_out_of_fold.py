from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from router.training.out_of_fold import (
    FoldPredictions,
    PredictionCache,
    content_key,
    predict_folds,
    stratified_folds,
)


def test_stratified_folds_spread_every_class_evenly() -> None:
    targets = np.repeat([0, 1, 2], [10, 7, 3])
    fold_of = stratified_folds(targets, 3, seed=0)
    for label in range(3):
        counts = np.bincount(fold_of[targets == label], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(fold_of, stratified_folds(targets, 3, seed=0))
    assert not np.array_equal(fold_of, stratified_folds(targets, 3, seed=1))
    with pytest.raises(ValueError, match="at least two folds"):
        stratified_folds(targets, 1, seed=0)


def test_each_training_row_is_predicted_by_a_model_that_never_saw_it() -> None:
    texts = [f"row {i}" for i in range(12)]
    labels = ["a", "b", "c"] * 4
    vectors = np.arange(12, dtype=np.float32)[:, None]
    seen_when_predicting: dict[str, set[str]] = {}

    def fake_fit_predict(
        train_texts: list[str],
        _train_vectors: np.ndarray,
        train_labels: list[str],
        query_texts: list[str],
        _query_vectors: np.ndarray,
    ) -> tuple[list[str], np.ndarray]:
        for text in query_texts:
            seen_when_predicting[text] = set(train_texts)
        classes = sorted(set(train_labels))
        return classes, np.log(np.full((len(query_texts), len(classes)), 1 / len(classes)))

    fold_of = np.arange(12) % 3  # every "c" row is in fold 2, so its model never learns "c"
    result = predict_folds(fake_fit_predict, texts, vectors, labels, fold_of, ["new"], vectors[:1])
    assert result.classes == ["a", "b", "c"]
    for text in texts:
        assert text not in seen_when_predicting[text]
    assert seen_when_predicting["new"] == set(texts)  # test rows: the model of all train rows
    row_two_fold = fold_of == fold_of[2]
    assert np.all(result.validation_log_p[row_two_fold, 2] < -20)
    assert result.test_log_p.shape == (1, 3)


def test_content_key_changes_with_any_input() -> None:
    base = content_key(("text-logreg", 5), (["a", "b"],), (np.zeros(2),))
    assert base == content_key(("text-logreg", 5), (["a", "b"],), (np.zeros(2),))
    assert base != content_key(("text-logreg", 4), (["a", "b"],), (np.zeros(2),))
    assert base != content_key(("text-logreg", 5), (["ab"],), (np.zeros(2),))
    assert base != content_key(("text-logreg", 5), (["a", "b"],), (np.ones(2),))
    assert base != content_key(("text-logreg", 5), (["a", "b"],), (np.zeros(2, np.float32),))


def test_cache_round_trip_and_unreadable_file(tmp_path: Path) -> None:
    cache = PredictionCache(tmp_path / "cache")
    stored = FoldPredictions(["law", "math"], np.array([0, 1]), np.eye(2), np.ones((3, 2)))
    assert cache.load("key") is None
    cache.save("key", stored)
    loaded = cache.load("key")
    assert loaded is not None and loaded.classes == ["law", "math"]
    assert np.array_equal(loaded.validation_log_p, stored.validation_log_p)
    assert np.array_equal(loaded.test_log_p, stored.test_log_p)
    assert list(tmp_path.joinpath("cache").iterdir()) == [cache.path("key")]  # no temporary left
    cache.path("key").write_bytes(b"not an npz")
    assert cache.load("key") is None
