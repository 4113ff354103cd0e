"""What an offline routing evaluation knows about each prompt's category.

Two kinds of evidence, both computed so that no training row is judged by a model that
saw it:

- `class_predictions`: log p(class | prompt) from the configured classifier,
  cross-validated over the training rows (cached on disk by content hash, see
  router/training/out_of_fold.py) and from the classifier fitted on all of them for the test rows.
- `neighbour_indexes`: the nearest training prompts of every prompt, by sentence
  embedding and by TF-IDF words; leave-one-out for training rows. Their category votes
  are mixed with the classifier in router/training/vote_fit.py.

Classes are the categories, or category/source-family pairs ("physics/stemez") when
`subcategories` asks for a finer map; `parent` maps a class back to its category.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from router.classify.classifier import make_classifier
from router.classify.features import TextClassifier, TfidfFeatures
from router.classify.neighbour_votes import (
    NEIGHBOUR_KS,
    NeighbourIndex,
    nearest_neighbours,
    unit_rows,
)
from router.training.out_of_fold import (
    FoldPredictions,
    PredictionCache,
    content_key,
    predict_folds,
    stratified_folds,
)

PREDICTION_CACHE_FOLDER = "coe_quality"


def class_label(category: str, src: str, subcategories: bool) -> str:
    if not subcategories:
        return category
    family = src.split("-")[0]
    return f"{category}/{'mmlu' if family == 'ori_mmlu' else family}"


def parent(label: str) -> str:
    return label.split("/")[0]


def fit_predict(
    classifier: str,
    seed: int,
    train_texts: list[str],
    train_vectors: np.ndarray,
    labels: list[str],
    texts: list[str],
    vectors: np.ndarray,
) -> tuple[list[str], np.ndarray]:
    """(classes, log-probabilities of `texts`) from a classifier fitted on the train rows."""
    if classifier == TextClassifier.kind:
        text_model = TextClassifier(seed=seed).fit(train_texts, train_vectors, labels)
        probabilities = text_model.predict_proba_texts(texts, vectors)
        classes = text_model.categories
    else:
        model = make_classifier(classifier).fit(train_vectors, labels)
        probabilities, classes = model.predict_proba(vectors), model.categories
    return classes, np.log(np.clip(probabilities, 1e-12, None))


def class_predictions(
    classifier: str,
    folds: int,
    seed: int,
    train_texts: list[str],
    train_vectors: np.ndarray,
    labels: list[str],
    test_texts: list[str],
    test_vectors: np.ndarray,
    cache_dir: Path | None,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[FoldPredictions, bool]:
    """Cross-validated and test log-probabilities of the classes, and whether they were cached.

    Uses min(folds, rows of the rarest class) folds, at least two, so every class can
    be learned in every fold.
    """
    targets = np.unique(np.array(labels), return_inverse=True)[1]
    folds = max(min(folds, int(np.bincount(targets).min())), 2)
    key = content_key(
        (classifier, folds, seed),
        (train_texts, labels, test_texts),
        (train_vectors, test_vectors),
    )
    cache = None if cache_dir is None else PredictionCache(cache_dir / PREDICTION_CACHE_FOLDER)
    stored = None if cache is None else cache.load(key)
    if stored is not None:
        progress("cross-validated class predictions read from the cache")
        return stored, True
    predictions = predict_folds(
        lambda *rows: fit_predict(classifier, seed, *rows),
        train_texts,
        train_vectors,
        labels,
        stratified_folds(targets, folds, seed),
        test_texts,
        test_vectors,
        progress,
    )
    if cache is not None:
        cache.save(key, predictions)
    return predictions, False


def neighbour_indexes(
    train_texts: list[str],
    train_vectors: np.ndarray,
    test_texts: list[str],
    test_vectors: np.ndarray,
    depth: int = max(NEIGHBOUR_KS),
) -> tuple[list[NeighbourIndex], list[NeighbourIndex]]:
    """[by embedding, by TF-IDF] neighbours among the train rows, for train and test rows."""
    words = TfidfFeatures().fit(train_texts)
    sources = [
        (unit_rows(train_vectors), unit_rows(test_vectors)),
        (words.transform(train_texts), words.transform(test_texts)),
    ]
    train_indexes = [nearest_neighbours(t, t, depth, exclude_self=True) for t, _ in sources]
    test_indexes = [nearest_neighbours(q, t, depth) for t, q in sources]
    return train_indexes, test_indexes
