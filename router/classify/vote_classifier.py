"""The text classifier mixed with the category votes of its nearest training prompts.

`NeighbourVoteClassifier` serves what the quality benchmark measures as `soft-knn`:
p(c|x) from a `TextClassifier`, geometrically mixed with the category votes of the
training prompts nearest to x by embedding and by TF-IDF words (router/neighbour_votes.py).
It keeps the training prompts' unit embeddings and TF-IDF rows as references, so a
saved artifact grows with the training set (MMLU-Pro's 6,800 train rows: about 15 MB).

Training (`fit_neighbour_vote_classifier`) fits the mixture's weights on out-of-fold
predictions: each training prompt is judged by a classifier fitted without it and by
its neighbours other than itself, so the weights are those that predict unseen prompts.

Saved beside the text classifier in the same directory: `neighbour_votes.json` (the
mixture) and `neighbour_votes.npz` (references; no pickle). `load_router_classifier`
returns this class wherever those files are present.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from router.classify.classifier import ClassifierLoadError, _label_indices
from router.classify.features import TextClassifier
from router.classify.neighbour_votes import (
    NEIGHBOUR_KS,
    VoteMixture,
    fit_vote_mixture,
    nearest_neighbours,
    unit_rows,
)
from router.training.out_of_fold import predict_folds, stratified_folds

VOTES_META_FILE = "neighbour_votes.json"
VOTES_ARRAYS_FILE = "neighbour_votes.npz"


class NeighbourVoteClassifier:
    """A `TextClassifier` whose probabilities are mixed with nearest-neighbour votes.

    Same calls as `TextClassifier`: predict_proba_texts(texts, vectors),
    with_category(name, texts, vectors), save; `categories` are the classifier's.
    """

    kind = "text-logreg+votes"

    def __init__(
        self,
        classifier: TextClassifier,
        mixture: VoteMixture,
        reference_vectors: np.ndarray,
        reference_words: sp.csr_matrix,
        reference_targets: np.ndarray,
    ) -> None:
        rows = len(reference_targets)
        if reference_vectors.shape[0] != rows or reference_words.shape[0] != rows:
            raise ValueError(
                f"references disagree: {reference_vectors.shape[0]} vectors, "
                f"{reference_words.shape[0]} TF-IDF rows, {rows} targets"
            )
        if reference_vectors.shape[1] != classifier.dimension:
            raise ValueError(
                f"reference vectors have dimension {reference_vectors.shape[1]}, the "
                f"classifier {classifier.dimension}"
            )
        if rows < 2:
            raise ValueError("neighbour votes need at least two reference prompts")
        n_categories = len(classifier.categories)
        if not 0 <= int(reference_targets.min()) <= int(reference_targets.max()) < n_categories:
            raise ValueError(f"reference targets must index the {n_categories} categories")
        self.classifier = classifier
        self.mixture = mixture
        self.reference_vectors = np.asarray(reference_vectors, dtype=np.float32)
        self.reference_words = sp.csr_matrix(reference_words)
        self.reference_targets = np.asarray(reference_targets, dtype=np.int64)
        # (terms, references) in CSR: a query's similarities are a product with it.
        self._words_by_term = sp.csr_matrix(self.reference_words.T)

    @property
    def categories(self) -> list[str]:
        return self.classifier.categories

    def predict_proba_texts(self, texts: list[str], vectors: np.ndarray) -> np.ndarray:
        log_p = np.log(np.clip(self.classifier.predict_proba_texts(texts, vectors), 1e-12, None))
        depth = min(self.mixture.k, len(self.reference_targets))
        by_vector = nearest_neighbours(
            unit_rows(vectors, np.float32), self.reference_vectors, depth
        )
        by_words = nearest_neighbours(
            self._word_rows(texts), self.reference_words, depth, transposed=self._words_by_term
        )
        return self.mixture.probabilities(log_p, [by_vector, by_words], self.reference_targets)

    def _word_rows(self, texts: list[str]) -> sp.csr_matrix:
        tfidf = self.classifier.tfidf
        if len(texts) != 1:
            return tfidf.transform(texts)
        # One prompt, the route path: without scikit-learn's vectoriser machinery.
        columns, values = tfidf.term_weights(texts[0])
        rows = np.zeros(len(columns), dtype=np.int64)
        return sp.csr_matrix((values, (rows, columns)), shape=(1, tfidf.size))

    def with_category(
        self, name: str, example_texts: list[str], example_vectors: np.ndarray
    ) -> NeighbourVoteClassifier:
        """One more category, learned by the classifier and voted for by its examples."""
        extended = self.classifier.with_category(name, example_texts, example_vectors)
        new_target = len(self.classifier.categories)
        return NeighbourVoteClassifier(
            extended,
            self.mixture,
            np.vstack([self.reference_vectors, unit_rows(example_vectors, np.float32)]),
            sp.csr_matrix(
                sp.vstack(
                    [self.reference_words, self.classifier.tfidf.transform(example_texts)],
                    format="csr",
                )
            ),
            np.concatenate(
                [self.reference_targets, np.full(len(example_texts), new_target, dtype=np.int64)]
            ),
        )

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.classifier.save(directory)
        words = self.reference_words
        np.savez(
            directory / VOTES_ARRAYS_FILE,
            vectors=self.reference_vectors,
            targets=self.reference_targets,
            word_data=words.data,
            word_indices=words.indices,
            word_indptr=words.indptr,
        )
        meta = {"kind": self.kind, "mixture": asdict(self.mixture)}
        (directory / VOTES_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", "utf-8")


def has_neighbour_votes(directory: Path) -> bool:
    return (Path(directory) / VOTES_META_FILE).is_file()


def load_neighbour_votes(directory: Path, classifier: TextClassifier) -> NeighbourVoteClassifier:
    """The vote mixture saved in `directory` around its already loaded text classifier."""
    directory = Path(directory)
    arrays_path = directory / VOTES_ARRAYS_FILE
    if not arrays_path.is_file():
        raise ClassifierLoadError(f"saved classifier file {arrays_path} does not exist")
    try:
        meta = json.loads((directory / VOTES_META_FILE).read_text("utf-8"))
        mixture = meta["mixture"]
        with np.load(arrays_path, allow_pickle=False) as stored:
            words = sp.csr_matrix(
                (stored["word_data"], stored["word_indices"], stored["word_indptr"]),
                shape=(len(stored["word_indptr"]) - 1, classifier.tfidf.size),
            )
            return NeighbourVoteClassifier(
                classifier,
                VoteMixture(
                    float(mixture["classifier_weight"]),
                    tuple(float(w) for w in mixture["vote_weights"]),
                    int(mixture["k"]),
                    float(mixture["sharpness"]),
                    float(mixture["temperature"]),
                ),
                stored["vectors"],
                words,
                stored["targets"],
            )
    except KeyError as error:
        raise ClassifierLoadError(
            f"saved neighbour votes in {directory} lack {error.args[0]!r}"
        ) from None
    except (OSError, TypeError, ValueError) as error:
        raise ClassifierLoadError(
            f"cannot read saved neighbour votes in {directory}: {error}"
        ) from None


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
    targets = _label_indices(categories, labels)
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
