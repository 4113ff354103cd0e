"""The text classifier mixed with nearest-neighbour votes: fit, predict, save, load, extend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from router.classify.classifier import ClassifierLoadError
from router.classify.features import TextClassifier
from router.classify.loading import load_router_classifier
from router.classify.neighbour_votes import VoteMixture
from router.classify.vote_classifier import (
    VOTES_ARRAYS_FILE,
    VOTES_META_FILE,
    NeighbourVoteClassifier,
)
from router.training.vote_fit import fit_neighbour_vote_classifier
from tests.unit.router.classify.test_classifier import text_data


@pytest.fixture(scope="module")
def fitted() -> NeighbourVoteClassifier:
    texts, vectors, labels = text_data(30, seed=0)
    return fit_neighbour_vote_classifier(texts, vectors, labels, folds=3)


def test_fit_predict_save_load_round_trip(fitted: NeighbourVoteClassifier, tmp_path: Path) -> None:
    test_texts, test_vectors, test_labels = text_data(10, seed=1)
    probabilities = fitted.predict_proba_texts(test_texts, test_vectors)
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    predicted = np.array(fitted.categories)[probabilities.argmax(axis=1)]
    assert np.mean(predicted == np.array(test_labels)) > 0.9
    assert len(fitted.reference_targets) == 90  # every training prompt votes

    fitted.save(tmp_path / "votes")
    loaded = load_router_classifier(tmp_path / "votes")
    assert isinstance(loaded, NeighbourVoteClassifier)
    assert loaded.mixture == fitted.mixture
    assert np.allclose(loaded.predict_proba_texts(test_texts, test_vectors), probabilities)


def test_one_prompt_path_agrees_with_the_batch_path(fitted: NeighbourVoteClassifier) -> None:
    texts, vectors, _ = text_data(4, seed=2)
    batch = fitted.predict_proba_texts(texts, vectors)
    one_by_one = [fitted.predict_proba_texts([t], vectors[i : i + 1]) for i, t in enumerate(texts)]
    assert np.allclose(np.vstack(one_by_one), batch)


def test_votes_of_the_nearest_prompt_decide_when_weighted_alone() -> None:
    texts, vectors, labels = text_data(20, seed=0)
    classifier = TextClassifier(min_df=1).fit(texts, vectors, labels)
    # The references say the opposite of the labels the classifier learned: with all
    # the weight on the embedding votes, the nearest reference's category wins.
    flipped = np.array([(classifier.categories.index(label) + 1) % 3 for label in labels])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    votes_only = VoteMixture(0.0, (1.0, 0.0), k=1, sharpness=0.05, temperature=1.0)
    mixed = NeighbourVoteClassifier(
        classifier, votes_only, unit, classifier.tfidf.transform(texts), flipped
    )
    probabilities = mixed.predict_proba_texts(texts[:5], vectors[:5])
    assert list(probabilities.argmax(axis=1)) == list(flipped[:5])


def test_with_category_adds_voting_examples(fitted: NeighbourVoteClassifier) -> None:
    new_texts = ["poem rhyme verse", "verse poem stanza", "rhyme stanza poem"]
    new_vectors = np.random.default_rng(3).normal(size=(3, fitted.classifier.dimension))
    extended = fitted.with_category("delta", new_texts, new_vectors)
    assert extended.categories == [*fitted.categories, "delta"]
    assert len(extended.reference_targets) == len(fitted.reference_targets) + 3
    assert list(extended.reference_targets[-3:]) == [3, 3, 3]
    assert len(fitted.categories) == 3  # the original is unchanged
    guess = extended.predict_proba_texts(["a poem with rhyme"], new_vectors[:1])
    assert extended.categories[int(guess.argmax())] == "delta"


def test_bad_references_are_refused(fitted: NeighbourVoteClassifier) -> None:
    words, vectors = fitted.reference_words, fitted.reference_vectors
    targets = fitted.reference_targets
    with pytest.raises(ValueError, match="references disagree"):
        NeighbourVoteClassifier(fitted.classifier, fitted.mixture, vectors[:-1], words, targets)
    with pytest.raises(ValueError, match="must index the 3 categories"):
        NeighbourVoteClassifier(fitted.classifier, fitted.mixture, vectors, words, targets + 3)
    with pytest.raises(ValueError, match="dimension"):
        NeighbourVoteClassifier(fitted.classifier, fitted.mixture, vectors[:, :2], words, targets)
    with pytest.raises(ValueError, match="at least two reference"):
        NeighbourVoteClassifier(
            fitted.classifier, fitted.mixture, vectors[:1], sp.csr_matrix(words[:1]), targets[:1]
        )


def test_load_errors_name_the_problem(fitted: NeighbourVoteClassifier, tmp_path: Path) -> None:
    directory = tmp_path / "votes"
    fitted.save(directory)
    (directory / VOTES_ARRAYS_FILE).unlink()
    with pytest.raises(ClassifierLoadError, match=r"neighbour_votes\.npz does not exist"):
        load_router_classifier(directory)

    fitted.save(directory)
    meta = json.loads((directory / VOTES_META_FILE).read_text())
    del meta["mixture"]["sharpness"]
    (directory / VOTES_META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ClassifierLoadError, match="lack 'sharpness'"):
        load_router_classifier(directory)

    (directory / VOTES_META_FILE).write_text("{not json")
    with pytest.raises(ClassifierLoadError, match="cannot read saved neighbour votes"):
        load_router_classifier(directory)
