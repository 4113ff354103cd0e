"""Nearest-neighbour search, the votes it gives and the mixture that weighs them."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from router.classify.neighbour_votes import (
    NeighbourIndex,
    VoteMixture,
    nearest_neighbours,
    neighbour_votes,
)


def unit_rows(count: int, dimension: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, dimension))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def brute_force(queries: np.ndarray, references: np.ndarray, k: int, skip_self: bool) -> np.ndarray:
    similarities = queries @ references.T
    if skip_self:
        np.fill_diagonal(similarities, -np.inf)
    return np.argsort(-similarities, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_nearest_neighbours_match_brute_force(sparse: bool, exclude_self: bool) -> None:
    references = unit_rows(60, 8, seed=1)
    queries = references if exclude_self else unit_rows(25, 8, seed=2)
    to_matrix = sp.csr_matrix if sparse else np.asarray
    index = nearest_neighbours(to_matrix(queries), to_matrix(references), 7, exclude_self)
    assert index.indices.shape == (len(queries), 7)
    assert np.array_equal(index.indices, brute_force(queries, references, 7, exclude_self))
    assert np.all(np.diff(index.similarities, axis=1) <= 1e-12)  # most similar first
    if exclude_self:
        assert not np.any(index.indices == np.arange(len(queries))[:, None])


def test_nearest_neighbours_are_chunked_consistently(monkeypatch: pytest.MonkeyPatch) -> None:
    import router.classify.neighbour_votes as module

    references = unit_rows(50, 6, seed=3)
    whole = nearest_neighbours(references, references, 5, exclude_self=True)
    monkeypatch.setattr(module, "_CHUNK", 7)  # the diagonal must be found in every chunk
    chunked = nearest_neighbours(references, references, 5, exclude_self=True)
    assert np.array_equal(whole.indices, chunked.indices)


def test_depth_is_clipped_to_the_references() -> None:
    references = unit_rows(4, 3, seed=4)
    index = nearest_neighbours(references, references, 10, exclude_self=True)
    assert index.depth == 3


@pytest.mark.parametrize(
    ("queries", "references", "k", "exclude_self", "message"),
    [
        (np.ones((2, 3)), np.ones((4, 3)), 0, False, "k must be >= 1"),
        (np.ones((2, 3)), np.ones((4, 2)), 1, False, "3 features, references 2"),
        (np.ones((2, 3)), np.ones((4, 3)), 1, True, "needs the references as queries"),
        (np.ones((1, 3)), np.ones((1, 3)), 1, True, "at least one reference row besides"),
    ],
)
def test_bad_neighbour_queries_are_rejected(
    queries: np.ndarray, references: np.ndarray, k: int, exclude_self: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        nearest_neighbours(queries, references, k, exclude_self)


def test_votes_weigh_closer_neighbours_more() -> None:
    index = NeighbourIndex(np.array([[0, 1, 2]]), np.array([[0.9, 0.8, 0.1]]))
    targets = np.array([1, 0, 0])
    sharp = neighbour_votes(index, targets, 3, k=3, sharpness=0.01)
    flat = neighbour_votes(index, targets, 3, k=3, sharpness=100.0)
    assert sharp.sum() == pytest.approx(1.0) and flat.sum() == pytest.approx(1.0)
    assert sharp[0, 1] > 0.99  # the closest neighbour decides
    assert flat[0, 0] == pytest.approx(2 / 3, abs=0.01)  # every neighbour counts alike
    assert sharp[0, 2] == 0.0
    only_first = neighbour_votes(index, targets, 3, k=1, sharpness=1.0)
    assert np.array_equal(only_first, [[0.0, 1.0, 0.0]])


def test_bad_votes_are_rejected() -> None:
    index = NeighbourIndex(np.array([[0]]), np.array([[1.0]]))
    with pytest.raises(ValueError, match="sharpness > 0"):
        neighbour_votes(index, np.array([0]), 2, k=1, sharpness=0.0)
    with pytest.raises(ValueError, match="class numbers in \\[0, 2\\)"):
        neighbour_votes(index, np.array([5]), 2, k=1, sharpness=1.0)


def test_mixture_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="not all 0"):
        VoteMixture(0.0, (0.0,), 10, 0.05, 1.0)
    with pytest.raises(ValueError, match="temperature > 0"):
        VoteMixture(1.0, (0.0,), 10, 0.05, 0.0)
    mixture = VoteMixture(0.5, (0.5,), 3, 0.05, 1.0)
    index = NeighbourIndex(np.zeros((2, 1), dtype=np.int64), np.ones((2, 1)))
    with pytest.raises(ValueError, match="1 neighbour sources, got 2"):
        mixture.probabilities(np.zeros((2, 2)), [index, index], np.array([0, 1]))
    with pytest.raises(ValueError, match="index has 2 rows, classifier 3"):
        mixture.probabilities(np.zeros((3, 2)), [index], np.array([0, 1]))
