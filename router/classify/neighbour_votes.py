"""Category votes of a prompt's nearest labelled neighbours, mixed with a classifier.

A linear classifier over [TF-IDF, embedding] and a vote of the most similar labelled
prompts make different mistakes: the vote catches near-duplicates and the idioms of
one source text book (MMLU-Pro draws many questions from the same chapters), the
classifier the vocabulary of a whole category. Their geometric mixture

    log p(c|x) = w_0 log p_classifier(c|x) + sum_s w_s log(vote_s(c|x) + floor),

renormalised with one temperature, is better calibrated and more accurate than either
(on MMLU-Pro train, cross-validated: 83.4% -> 86.7% category accuracy). The weights,
the number of neighbours, how sharply similarity weighs a neighbour and the temperature
are all chosen by cross-validated log loss (router.training.vote_fit.fit_vote_mixture).

Neighbours are by cosine similarity; rows of both sides must already be L2-normalised
(sentence embeddings and `TfidfFeatures` rows are). Queries may be the references
themselves with `exclude_self`, giving leave-one-out votes for the training rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from router.classify.calibration import power_softmax

# Rows of queries compared with all references at once: bounds memory to
# _CHUNK x references similarities.
_CHUNK = 1024
# A class no neighbour voted for keeps this much vote, so one source cannot veto it.
VOTE_FLOOR = 1e-2
# The numbers of neighbours a vote mixture may weigh; indexes are built max() deep.
NEIGHBOUR_KS = (10, 20, 40)


def unit_rows(vectors: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero), as cosine neighbours need."""
    vectors = np.asarray(vectors, dtype=dtype)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class NeighbourIndex:
    """The k most similar reference rows of every query, most similar first."""

    indices: np.ndarray  # (N, K) reference row numbers
    similarities: np.ndarray  # (N, K) cosine similarities, descending along each row

    @property
    def depth(self) -> int:
        return int(self.indices.shape[1])


def _dense_rows(matrix: Any, start: int, stop: int) -> np.ndarray:
    block = matrix[start:stop]
    if sp.issparse(block):
        return np.asarray(block.toarray(), dtype=np.float64)
    return np.asarray(block, dtype=np.float64)


def nearest_neighbours(
    queries: Any,
    references: Any,
    k: int,
    exclude_self: bool = False,
    transposed: Any = None,
) -> NeighbourIndex:
    """Top-k references by cosine similarity for each query (dense arrays or scipy sparse).

    exclude_self: queries ARE the references (same rows, same order); a row never
    counts as its own neighbour, so the votes of training rows are leave-one-out.
    transposed: `references.T` made once by a caller that asks again and again (for a
    sparse matrix, in CSR: transposing costs more than one query's product).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_queries, n_references = queries.shape[0], references.shape[0]
    if queries.shape[1] != references.shape[1]:
        raise ValueError(
            f"queries have {queries.shape[1]} features, references {references.shape[1]}"
        )
    if exclude_self and n_queries != n_references:
        raise ValueError(
            f"exclude_self needs the references as queries: {n_queries} != {n_references} rows"
        )
    available = n_references - (1 if exclude_self else 0)
    if available < 1:
        raise ValueError("need at least one reference row besides the query itself")
    depth = min(k, available)
    if transposed is None:
        transposed = references.T
    indices = np.zeros((n_queries, depth), dtype=np.int64)
    similarities = np.zeros((n_queries, depth), dtype=np.float64)
    for start in range(0, n_queries, _CHUNK):
        stop = min(start + _CHUNK, n_queries)
        block = queries[start:stop] @ transposed
        scores = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
        if exclude_self:
            scores[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        if depth < scores.shape[1]:
            top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        else:
            top = np.tile(np.arange(scores.shape[1]), (stop - start, 1))
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        indices[start:stop] = np.take_along_axis(top, order, axis=1)
        similarities[start:stop] = np.take_along_axis(top_scores, order, axis=1)
    return NeighbourIndex(indices, similarities)


def neighbour_votes(
    index: NeighbourIndex, targets: np.ndarray, n_classes: int, k: int, sharpness: float
) -> np.ndarray:
    """(N, n_classes) share of the k nearest neighbours' weight per class; rows sum to 1.

    A neighbour weighs exp((similarity - best similarity) / sharpness): the smaller the
    sharpness, the more the closest few decide.
    """
    if not (k >= 1 and sharpness > 0):
        raise ValueError(f"need k >= 1 and sharpness > 0, got k={k}, sharpness={sharpness}")
    targets = np.asarray(targets, dtype=np.int64)
    if targets.size and not (targets.min() >= 0 and targets.max() < n_classes):
        raise ValueError(f"targets must be class numbers in [0, {n_classes})")
    depth = min(k, index.depth)
    similarities = index.similarities[:, :depth]
    weights = np.exp((similarities - similarities[:, :1]) / sharpness)
    votes = np.zeros((len(similarities), n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(similarities)), depth)
    np.add.at(votes, (rows, targets[index.indices[:, :depth]].ravel()), weights.ravel())
    return votes / votes.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class VoteMixture:
    """Weights of the classifier and of each neighbour source, and the shared settings."""

    classifier_weight: float
    vote_weights: tuple[float, ...]  # one per neighbour source, in the order given
    k: int
    sharpness: float
    temperature: float

    def __post_init__(self) -> None:
        weights = (self.classifier_weight, *self.vote_weights)
        if any(not (math.isfinite(w) and w >= 0) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be >= 0 and not all 0, got {weights}")
        if not (self.k >= 1 and self.sharpness > 0 and self.temperature > 0):
            raise ValueError(
                f"need k >= 1, sharpness > 0, temperature > 0; got {self.k}, "
                f"{self.sharpness}, {self.temperature}"
            )

    def log_scores(
        self,
        classifier_log_probabilities: np.ndarray,
        indexes: Sequence[NeighbourIndex],
        targets: np.ndarray,
    ) -> np.ndarray:
        """Un-normalised mixed log-probabilities, before the temperature."""
        if len(indexes) != len(self.vote_weights):
            raise ValueError(
                f"mixture has {len(self.vote_weights)} neighbour sources, got {len(indexes)}"
            )
        log_p = np.asarray(classifier_log_probabilities, dtype=np.float64)
        mixed = self.classifier_weight * log_p
        for weight, index in zip(self.vote_weights, indexes, strict=True):
            if len(index.indices) != len(log_p):
                raise ValueError(
                    f"neighbour index has {len(index.indices)} rows, classifier {len(log_p)}"
                )
            if weight > 0:
                votes = neighbour_votes(index, targets, log_p.shape[1], self.k, self.sharpness)
                mixed = mixed + weight * np.log(votes + VOTE_FLOOR)
        return np.asarray(mixed)

    def probabilities(
        self,
        classifier_log_probabilities: np.ndarray,
        indexes: Sequence[NeighbourIndex],
        targets: np.ndarray,
    ) -> np.ndarray:
        scores = self.log_scores(classifier_log_probabilities, indexes, targets)
        return power_softmax(scores, self.temperature)
