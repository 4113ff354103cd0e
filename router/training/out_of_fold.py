"""Out-of-fold category predictions for every training row, cached by content hash.

Routing settings are chosen on training questions, so their category probabilities
must come from a classifier that never saw them: the rows are split into stratified
folds and each fold is predicted by a classifier fitted on the others. Fitting those
classifiers is the slow part of a quality benchmark, so the predictions are stored
under the cache directory, keyed by a hash of everything they depend on (texts,
labels, vectors, classifier settings); any change to those gives a new key.
Stored as `.npz` read with allow_pickle=False.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Bump when what is stored, or how it is computed, changes.
CACHE_FORMAT = "out-of-fold-v1"
LOG_FLOOR = float(np.log(1e-12))

# (train texts, train vectors, labels, texts, vectors) -> (classes, log-probabilities)
FitPredict = Callable[
    [list[str], np.ndarray, list[str], list[str], np.ndarray], tuple[list[str], np.ndarray]
]


def stratified_folds(targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number of every row: each class's rows dealt round-robin after a seeded shuffle."""
    targets = np.asarray(targets, dtype=np.int64)
    if folds < 2:
        raise ValueError(f"need at least two folds, got {folds}")
    fold_of = np.zeros(len(targets), dtype=np.int64)
    for index in np.unique(targets):
        rows = np.flatnonzero(targets == index)
        permuted = np.random.default_rng(seed + int(index)).permutation(rows)
        fold_of[permuted] = np.arange(len(rows)) % folds
    return fold_of


@dataclass(frozen=True)
class FoldPredictions:
    """Held-out log-probabilities of the training rows, and of the test rows."""

    classes: list[str]
    fold_of: np.ndarray  # (N_train,) fold of each training row
    validation_log_p: np.ndarray  # (N_train, C) each row from a classifier that did not see it
    test_log_p: np.ndarray  # (N_test, C) from the classifier fitted on all training rows


def predict_folds(
    fit_predict: FitPredict,
    texts: list[str],
    vectors: np.ndarray,
    labels: list[str],
    fold_of: np.ndarray,
    test_texts: list[str],
    test_vectors: np.ndarray,
    progress: Callable[[str], None] = lambda _: None,
) -> FoldPredictions:
    classes = sorted(set(labels))
    folds = np.unique(fold_of)
    validation = np.full((len(texts), len(classes)), LOG_FLOOR)
    for number, fold in enumerate(folds):
        held, kept = np.flatnonzero(fold_of == fold), np.flatnonzero(fold_of != fold)
        progress(f"cross-validation fold {number + 1}/{len(folds)}")
        fold_classes, log_p = fit_predict(
            [texts[i] for i in kept],
            vectors[kept],
            [labels[i] for i in kept],
            [texts[i] for i in held],
            vectors[held],
        )
        # A fold may lack a rare class: its column keeps the floor.
        columns = np.array([classes.index(c) for c in fold_classes], dtype=np.int64)
        validation[np.ix_(held, columns)] = log_p
    progress("fitting the final classifier on all training rows")
    final_classes, test_log_p = fit_predict(texts, vectors, labels, test_texts, test_vectors)
    if list(final_classes) != classes:
        raise ValueError(f"final classifier has classes {final_classes}, expected {classes}")
    return FoldPredictions(classes, np.asarray(fold_of), validation, np.asarray(test_log_p))


def content_key(
    settings: Sequence[object], texts: Sequence[Sequence[str]], arrays: Sequence[np.ndarray]
) -> str:
    """sha256 over the settings, every text (length-prefixed) and every array's bytes."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    digest.update(repr(tuple(settings)).encode())
    for group in texts:
        digest.update(f"[{len(group)}]".encode())
        for text in group:
            encoded = text.encode("utf-8")
            digest.update(f"{len(encoded)}:".encode())
            digest.update(encoded)
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
        digest.update(contiguous.tobytes())
    return digest.hexdigest()


class PredictionCache:
    """FoldPredictions stored as `<directory>/<key>.npz`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def load(self, key: str) -> FoldPredictions | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                return FoldPredictions(
                    [str(c) for c in stored["classes"]],
                    stored["fold_of"],
                    stored["validation_log_p"],
                    stored["test_log_p"],
                )
        except (OSError, KeyError, ValueError):
            return None  # unreadable or partial: recompute and overwrite

    def save(self, key: str, predictions: FoldPredictions) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".npz.tmp")
        os.close(handle)
        try:
            with open(temporary, "wb") as stream:
                np.savez(
                    stream,
                    classes=np.array(predictions.classes, dtype=str),
                    fold_of=predictions.fold_of,
                    validation_log_p=predictions.validation_log_p,
                    test_log_p=predictions.test_log_p,
                )
            os.replace(temporary, self.path(key))  # atomic: readers never see half a file
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
