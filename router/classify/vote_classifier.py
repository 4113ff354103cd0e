"""The text classifier mixed with the category votes of its nearest training prompts.

`NeighbourVoteClassifier` serves what the quality benchmark measures as `soft-knn`:
p(c|x) from a `TextClassifier`, geometrically mixed with the category votes of the
training prompts nearest to x by embedding and by TF-IDF words
(router/classify/neighbour_votes.py). It keeps the training prompts' unit embeddings and
TF-IDF rows as references, so a saved artifact grows with the training set (MMLU-Pro's
6,800 train rows: about 15 MB). It is fitted by router.training.vote_fit.

Saved beside the text classifier in the same directory: `neighbour_votes.json` (the
mixture) and `neighbour_votes.npz` (references; no pickle).
`router.classify.loading.load_router_classifier` returns this class wherever those files
are present.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from router.classify.classifier import ClassifierLoadError
from router.classify.features import TextClassifier
from router.classify.neighbour_votes import VoteMixture, nearest_neighbours, unit_rows

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
