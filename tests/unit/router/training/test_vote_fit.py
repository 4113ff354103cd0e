"""Fitting neighbour-vote classifiers: the vote mixture's grid search and its input checks."""

from __future__ import annotations

import numpy as np
import pytest

from router.classify.neighbour_votes import NeighbourIndex, nearest_neighbours
from router.training.vote_fit import fit_neighbour_vote_classifier, fit_vote_mixture, log_loss
from tests.unit.router.classify.test_classifier import text_data


def clustered_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points around three class centres, and a classifier that knows nothing."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 5)
    targets = np.repeat(np.arange(3), 40)
    points = centres[targets] + 0.3 * rng.normal(size=(len(targets), 5))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    uninformed = np.log(np.full((len(targets), 3), 1 / 3))
    return points, targets, uninformed


def test_mixture_trusts_informative_votes_over_a_blind_classifier() -> None:
    points, targets, uninformed = clustered_problem()
    index = nearest_neighbours(points, points, 10, exclude_self=True)
    mixture = fit_vote_mixture(uninformed, [index], targets, ks=(5, 10), sharpnesses=(0.1,))
    assert mixture.vote_weights[0] > 0
    mixed = mixture.probabilities(uninformed, [index], targets)
    assert np.allclose(mixed.sum(axis=1), 1.0)
    assert (mixed.argmax(axis=1) == targets).mean() > 0.9
    assert log_loss(mixed, targets) < log_loss(np.exp(uninformed), targets)


def test_mixture_ignores_votes_that_carry_no_information() -> None:
    _, targets, _ = clustered_problem()
    rng = np.random.default_rng(5)
    confident = np.log(np.where(np.eye(3)[targets] == 1, 0.9, 0.05))
    scrambled = NeighbourIndex(
        rng.integers(0, len(targets), size=(len(targets), 10)), np.zeros((len(targets), 10))
    )
    mixture = fit_vote_mixture(confident, [scrambled], targets, ks=(10,), sharpnesses=(1.0,))
    assert mixture.vote_weights == (0.0,) and mixture.classifier_weight == 1.0


def test_training_needs_two_prompts_per_category() -> None:
    texts, vectors, labels = text_data(5, seed=0)
    with pytest.raises(ValueError, match="at least two labelled prompts per category"):
        fit_neighbour_vote_classifier(texts[:11], vectors[:11], labels[:11])
    with pytest.raises(ValueError, match="one text and one vector per label"):
        fit_neighbour_vote_classifier(texts, vectors[:-1], labels)
