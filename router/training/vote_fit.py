"""Fitting a `NeighbourVoteClassifier`: its text classifier and its vote mixture.

The mixture's weights are fitted on out-of-fold predictions: each training prompt is
judged by a classifier fitted without it and by its neighbours other than itself, so
the weights are those that predict unseen prompts (`fit_neighbour_vote_classifier`).
`fit_vote_mixture` is the grid search over the mixture's settings on such evidence.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from router.classify.calibration import power_softmax
from router.classify.classifier import label_indices
from router.classify.features import TextClassifier
from router.classify.neighbour_votes import (
    NEIGHBOUR_KS,
    VOTE_FLOOR,
    NeighbourIndex,
    VoteMixture,
    nearest_neighbours,
    neighbour_votes,
    unit_rows,
)
from router.classify.vote_classifier import NeighbourVoteClassifier
from router.training.out_of_fold import predict_folds, stratified_folds
from router.training.temperature_fit import fit_power_temperature


def log_loss(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-probability of the true `targets` (clipped away from log 0)."""
    picked = probabilities[np.arange(len(targets)), targets]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def fit_vote_mixture(
    classifier_log_probabilities: np.ndarray,
    indexes: Sequence[NeighbourIndex],
    targets: np.ndarray,
    ks: Sequence[int] = NEIGHBOUR_KS,
    sharpnesses: Sequence[float] = (0.02, 0.05, 0.1),
    weight_step: float = 0.1,
    max_vote_share: float = 0.9,
) -> VoteMixture:
    """The mixture with the lowest log loss on held-out rows.

    classifier_log_probabilities must be out-of-fold (each row from a classifier that
    did not see it) and `indexes` leave-one-out, so the loss measures unseen prompts.
    Weights step over a grid on the simplex; the classifier keeps at least
    1 - max_vote_share. Ties keep the first (smaller k, sharper, less vote weight).
    """
    targets = np.asarray(targets, dtype=np.int64)
    if not 0 < weight_step <= 1:
        raise ValueError(f"weight_step must be in (0, 1], got {weight_step}")
    steps = np.round(np.arange(0.0, max_vote_share + 1e-9, weight_step), 10)
    best: tuple[float, VoteMixture] | None = None
    log_p = np.asarray(classifier_log_probabilities, dtype=np.float64)
    for k, sharpness in itertools.product(ks, sharpnesses):
        logs = [
            np.log(neighbour_votes(i, targets, log_p.shape[1], k, sharpness) + VOTE_FLOOR)
            for i in indexes
        ]
        for weights in itertools.product(steps, repeat=len(indexes)):
            share = float(sum(weights))
            if share > max_vote_share + 1e-9:
                continue
            mixed = (1.0 - share) * log_p + sum(
                (w * v for w, v in zip(weights, logs, strict=True)), np.zeros_like(log_p)
            )
            temperature = fit_power_temperature(mixed, targets)
            loss = log_loss(power_softmax(mixed, temperature), targets)
            if best is None or loss < best[0] - 1e-12:
                mixture = VoteMixture(
                    1.0 - share, tuple(float(w) for w in weights), k, sharpness, temperature
                )
                best = (loss, mixture)
    if best is None:
        raise ValueError("no mixture to try: ks and sharpnesses must not be empty")
    return best[1]


def fit_neighbour_vote_classifier(
    texts: list[str],
    vectors: np.ndarray,
    labels: list[str],
    folds: int = 5,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> NeighbourVoteClassifier:
    """Fit the text classifier on every row and the vote mixture on out-of-fold evidence.

    Uses min(folds, rows of the rarest category) folds, at least two; costs `folds` + 1
    classifier fits.
    """
    vectors = np.asarray(vectors)
    if len(texts) != len(labels) or len(vectors) != len(labels):
        raise ValueError(
            f"need one text and one vector per label: {len(texts)} texts, "
            f"{len(vectors)} vectors, {len(labels)} labels"
        )
    categories = sorted(set(labels))
    targets = label_indices(categories, labels)
    rarest = int(np.bincount(targets).min())
    if rarest < 2:
        raise ValueError("neighbour votes need at least two labelled prompts per category")
    fitted: list[TextClassifier] = []

    def fit_predict(
        fit_texts: list[str],
        fit_vectors: np.ndarray,
        fit_labels: list[str],
        held_texts: list[str],
        held_vectors: np.ndarray,
    ) -> tuple[list[str], np.ndarray]:
        model = TextClassifier(seed=seed).fit(fit_texts, fit_vectors, fit_labels)
        fitted.append(model)
        probabilities = model.predict_proba_texts(held_texts, held_vectors)
        return model.categories, np.log(np.clip(probabilities, 1e-12, None))

    # The last fit sees every row: it is the classifier kept. It "predicts" one row only
    # because predict_folds asks every fit for predictions.
    fold_of = stratified_folds(targets, max(min(folds, rarest), 2), seed)
    predictions = predict_folds(
        fit_predict, texts, vectors, labels, fold_of, texts[:1], vectors[:1], progress
    )
    classifier = fitted[-1]
    progress("nearest training prompts by embedding and by TF-IDF (leave-one-out)")
    unit = unit_rows(vectors, np.float32)
    words = classifier.tfidf.transform(texts)
    depth = max(NEIGHBOUR_KS)
    indexes = [
        nearest_neighbours(unit, unit, depth, exclude_self=True),
        nearest_neighbours(words, words, depth, exclude_self=True),
    ]
    progress("fitting the vote mixture on cross-validated log loss")
    mixture = fit_vote_mixture(predictions.validation_log_p, indexes, targets, ks=NEIGHBOUR_KS)
    return NeighbourVoteClassifier(classifier, mixture, unit, words, targets)
