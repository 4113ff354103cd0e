"""A category classifier over the prompt's words as well as its embedding.

Sentence embeddings blur the exact terms that name a subject ("Bernoulli", "tort",
"mitochondria"); TF-IDF word n-grams keep them. `TextClassifier` fits one multinomial
logistic regression over [TF-IDF n-grams, embedding_weight * embedding], so each
category's weights are learned jointly for both. Featurising one prompt costs well
under a millisecond next to the embedder.

The vocabulary and IDF weights are stored as JSON + `.npz` (no pickle); the transform
is done here from them, so a saved classifier needs no fitted scikit-learn object.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from router.classify.classifier import (
    ClassifierLoadError,
    check_new_category,
    check_training_data,
    fit_new_row,
    label_indices,
    read_saved,
    softmax,
)

TEXT_KIND = "text-logreg"
VOCABULARY_FILE = "vocabulary.json"
# scikit-learn's default token_pattern, which `fit` uses: the one-prompt path must agree.
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


class TfidfFeatures:
    """Sublinear TF-IDF over lower-cased word n-grams, L2-normalised per prompt."""

    def __init__(self, ngram_max: int = 2, min_df: int = 2) -> None:
        if ngram_max < 1 or min_df < 1:
            raise ValueError(f"ngram_max and min_df must be >= 1, got {ngram_max}, {min_df}")
        self.ngram_max = ngram_max
        self.min_df = min_df
        self.vocabulary: dict[str, int] = {}
        self.idf = np.zeros(0, dtype=np.float64)
        self._counter: Any = None

    def fit(self, texts: list[str]) -> TfidfFeatures:
        from sklearn.feature_extraction.text import TfidfVectorizer

        min_df = self.min_df if len(texts) >= 2 * self.min_df else 1
        try:
            fitted = TfidfVectorizer(ngram_range=(1, self.ngram_max), min_df=min_df).fit(texts)
        except ValueError:
            # A few short prompts may share no word: keep every word rather than none.
            try:
                fitted = TfidfVectorizer(ngram_range=(1, self.ngram_max), min_df=1).fit(texts)
            except ValueError:
                raise ValueError(
                    "the training prompts hold no word of two or more letters to weigh"
                ) from None
        self.vocabulary = {str(term): int(i) for term, i in fitted.vocabulary_.items()}
        self.idf = np.asarray(fitted.idf_, dtype=np.float64)
        self._counter = None
        return self

    def transform(self, texts: list[str]) -> sp.csr_matrix:
        if self._counter is None:
            from sklearn.feature_extraction.text import CountVectorizer

            self._counter = CountVectorizer(
                ngram_range=(1, self.ngram_max), vocabulary=self.vocabulary
            )
        counts = sp.csr_matrix(self._counter.transform(texts), dtype=np.float64)
        counts.data = 1.0 + np.log(counts.data)  # sublinear term frequency
        weighted = sp.csr_matrix(counts.multiply(self.idf[None, :]))
        norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel())
        scale = sp.diags(1.0 / np.maximum(norms, 1e-12))
        return sp.csr_matrix(scale @ weighted)

    def term_weights(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(columns, values) of `transform([text])`'s one row, without scipy or scikit-learn.

        The route path featurises one prompt at a time, where the sparse-matrix
        machinery costs far more than the arithmetic.
        """
        tokens = _TOKEN.findall(text.lower())
        vocabulary, counts = self.vocabulary, dict[int, int]()
        for n in range(1, self.ngram_max + 1):
            grams = (
                tokens
                if n == 1
                else [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
            )
            for gram in grams:
                column = vocabulary.get(gram)
                if column is not None:
                    counts[column] = counts.get(column, 0) + 1
        columns = np.fromiter(counts.keys(), np.int64, len(counts))
        frequency = np.fromiter(counts.values(), np.float64, len(counts))
        values = (1.0 + np.log(frequency)) * self.idf[columns]
        norm = float(np.sqrt(values @ values))
        return columns, values / max(norm, 1e-12)

    @property
    def size(self) -> int:
        return len(self.vocabulary)


class TextClassifier:
    """Logistic regression over [TF-IDF(prompt), embedding_weight * embedding(prompt)].

    Same life cycle as the vector classifiers, but every call takes the prompt texts
    next to their vectors: fit(texts, vectors, labels), predict_proba_texts(texts,
    vectors), with_category(name, texts, vectors), save / load_text_classifier.
    """

    kind = TEXT_KIND

    def __init__(
        self,
        regularisation: float = 30.0,
        embedding_weight: float = 1.0,
        ngram_max: int = 2,
        min_df: int = 2,
        temperature: float = 1.0,
        max_iter: int = 3000,
        anchors_per_category: int = 64,
        seed: int = 0,
    ) -> None:
        if regularisation <= 0 or embedding_weight < 0 or temperature <= 0:
            raise ValueError(
                "need regularisation > 0, embedding_weight >= 0, temperature > 0; got "
                f"{regularisation}, {embedding_weight}, {temperature}"
            )
        self.regularisation = regularisation
        self.embedding_weight = embedding_weight
        self.temperature = temperature
        self.max_iter = max_iter
        self.anchors_per_category = anchors_per_category
        self.seed = seed
        self.tfidf = TfidfFeatures(ngram_max, min_df)
        self.categories: list[str] = []
        self.dimension = 0
        self.weights = np.zeros((0, 0), dtype=np.float64)
        self.bias = np.zeros(0, dtype=np.float64)
        self.anchors = sp.csr_matrix((0, 0), dtype=np.float64)
        self.anchor_labels = np.zeros(0, dtype=np.int64)
        self._split: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def _split_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(terms x categories, categories x dimension) views of `weights`, made once."""
        if self._split is None or self._split[0] is not self.weights:
            size = self.tfidf.size
            terms = np.ascontiguousarray(self.weights[:, :size].T)
            vectors = np.ascontiguousarray(self.embedding_weight * self.weights[:, size:])
            self._split = (self.weights, terms, vectors)
        return self._split[1], self._split[2]

    def features(self, texts: list[str], vectors: np.ndarray) -> sp.csr_matrix:
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise ValueError(f"need one vector per text: {len(texts)} texts, {vectors.shape}")
        if self.dimension and vectors.shape[1] != self.dimension:
            raise ValueError(f"expected vectors of dimension {self.dimension}, got {vectors.shape}")
        dense = sp.csr_matrix(self.embedding_weight * vectors)
        return sp.csr_matrix(sp.hstack([self.tfidf.transform(texts), dense], format="csr"))

    def fit(self, texts: list[str], vectors: np.ndarray, labels: list[str]) -> TextClassifier:
        from sklearn.linear_model import LogisticRegression

        categories = check_training_data(np.asarray(vectors), labels)
        if len(texts) != len(labels):
            raise ValueError(f"need one text per label: {len(texts)} texts, {len(labels)} labels")
        if len(categories) < 2:
            raise ValueError(f"logistic regression needs at least two categories, got {categories}")
        self.tfidf.fit(texts)
        self.dimension = 0
        inputs = self.features(texts, vectors)
        targets = label_indices(categories, labels)
        model = LogisticRegression(C=self.regularisation, max_iter=self.max_iter)
        model.fit(inputs, targets)
        weights = np.asarray(model.coef_, dtype=np.float64)
        bias = np.asarray(model.intercept_, dtype=np.float64)
        if len(categories) == 2:  # sklearn keeps one row for two classes
            weights, bias = (
                np.vstack([-weights / 2, weights / 2]),
                np.array([-bias[0], bias[0]]) / 2,
            )
        self.categories, self.weights, self.bias = categories, weights, bias
        self.dimension = int(np.asarray(vectors).shape[1])
        rng = np.random.default_rng(self.seed)
        keep = np.concatenate(
            [
                rng.permutation(np.flatnonzero(targets == c))[: self.anchors_per_category]
                for c in range(len(categories))
            ]
        )
        self.anchors, self.anchor_labels = inputs[keep], targets[keep]
        return self

    def logits_of(self, inputs: sp.csr_matrix) -> np.ndarray:
        return np.asarray(inputs @ self.weights.T) + self.bias

    def logits(self, texts: list[str], vectors: np.ndarray) -> np.ndarray:
        if not self.categories:
            raise RuntimeError("TextClassifier used before fit")
        if len(texts) == 1 and np.ndim(vectors) == 2 and np.shape(vectors) == (1, self.dimension):
            terms, vector_weights = self._split_weights()
            columns, values = self.tfidf.term_weights(texts[0])
            vector = np.asarray(vectors[0], dtype=np.float64)
            return (values @ terms[columns] + vector_weights @ vector + self.bias)[None, :]
        return self.logits_of(self.features(texts, vectors))

    def predict_proba_texts(self, texts: list[str], vectors: np.ndarray) -> np.ndarray:
        return softmax(self.logits(texts, vectors), self.temperature)

    def with_category(
        self, name: str, example_texts: list[str], example_vectors: np.ndarray
    ) -> TextClassifier:
        """A new classifier with one more category; existing weights are left unchanged."""
        check_new_category(self.categories, name, np.asarray(example_vectors), self.dimension)
        examples = self.features(example_texts, example_vectors)
        inputs = sp.csr_matrix(sp.vstack([self.anchors, examples], format="csr"))
        own_labels = np.concatenate([self.anchor_labels, np.full(len(example_texts), -1)])
        row, bias = fit_new_row(inputs, self.logits_of(inputs), own_labels, self.regularisation)
        extended = self._copy()
        extended.categories = [*self.categories, name]
        extended.weights = np.vstack([self.weights, row])
        extended.bias = np.append(self.bias, bias)
        kept = examples[: self.anchors_per_category]
        extended.anchors = sp.csr_matrix(sp.vstack([self.anchors, kept], format="csr"))
        extended.anchor_labels = np.concatenate(
            [self.anchor_labels, np.full(kept.shape[0], len(self.categories), dtype=np.int64)]
        )
        return extended

    def _copy(self) -> TextClassifier:
        copy = TextClassifier(
            self.regularisation,
            self.embedding_weight,
            self.tfidf.ngram_max,
            self.tfidf.min_df,
            self.temperature,
            self.max_iter,
            self.anchors_per_category,
            self.seed,
        )
        copy.tfidf, copy.dimension = self.tfidf, self.dimension
        copy.categories, copy.weights, copy.bias = list(self.categories), self.weights, self.bias
        copy.anchors, copy.anchor_labels = self.anchors, self.anchor_labels
        return copy

    def save(self, directory: Path) -> None:
        if not self.categories:
            raise RuntimeError("cannot save an unfitted TextClassifier")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        anchors = self.anchors.tocsr()
        np.savez(
            directory / "arrays.npz",
            weights=self.weights,
            bias=self.bias,
            idf=self.tfidf.idf,
            anchor_data=anchors.data,
            anchor_indices=anchors.indices,
            anchor_indptr=anchors.indptr,
            anchor_labels=self.anchor_labels,
        )
        (directory / VOCABULARY_FILE).write_text(json.dumps(self.tfidf.vocabulary), "utf-8")
        meta = {
            "kind": self.kind,
            "format_version": 1,
            "categories": self.categories,
            "regularisation": self.regularisation,
            "embedding_weight": self.embedding_weight,
            "ngram_max": self.tfidf.ngram_max,
            "min_df": self.tfidf.min_df,
            "temperature": self.temperature,
            "max_iter": self.max_iter,
            "anchors_per_category": self.anchors_per_category,
            "seed": self.seed,
            "dimension": self.dimension,
        }
        (directory / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n", "utf-8")


def load_text_classifier(directory: Path) -> TextClassifier:
    meta, arrays = read_saved(directory)
    if meta["kind"] != TEXT_KIND:
        raise ClassifierLoadError(
            f"{directory} holds a {meta['kind']!r} classifier, not {TEXT_KIND!r}"
        )
    vocabulary_path = Path(directory) / VOCABULARY_FILE
    if not vocabulary_path.is_file():
        raise ClassifierLoadError(f"saved classifier file {vocabulary_path} does not exist")
    try:
        loaded = TextClassifier(
            float(meta["regularisation"]),
            float(meta["embedding_weight"]),
            int(meta["ngram_max"]),
            int(meta["min_df"]),
            float(meta["temperature"]),
            int(meta["max_iter"]),
            int(meta["anchors_per_category"]),
            int(meta["seed"]),
        )
        loaded.categories = list(meta["categories"])
        loaded.dimension = int(meta["dimension"])
        loaded.tfidf.vocabulary = json.loads(vocabulary_path.read_text("utf-8"))
        loaded.tfidf.idf = arrays["idf"]
        loaded.weights, loaded.bias = arrays["weights"], arrays["bias"]
        width = loaded.tfidf.size + loaded.dimension
        loaded.anchors = sp.csr_matrix(
            (arrays["anchor_data"], arrays["anchor_indices"], arrays["anchor_indptr"]),
            shape=(len(arrays["anchor_indptr"]) - 1, width),
        )
        loaded.anchor_labels = arrays["anchor_labels"]
    except KeyError as error:
        raise ClassifierLoadError(f"saved {TEXT_KIND} classifier lacks {error.args[0]!r}") from None
    if loaded.weights.shape != (len(loaded.categories), width) or len(loaded.tfidf.idf) != (
        loaded.tfidf.size
    ):
        raise ClassifierLoadError(
            f"saved weights have shape {loaded.weights.shape} and {len(loaded.tfidf.idf)} IDF "
            f"weights; expected ({len(loaded.categories)}, {width}) and {loaded.tfidf.size}"
        )
    return loaded
