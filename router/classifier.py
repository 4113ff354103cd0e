"""Few-shot category classifiers over embedding vectors.

Both classifiers turn cosine similarities into probabilities with a temperature
softmax, so the router's confidence (the top probability) means the same thing
whichever one is configured.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class CategoryClassifier(Protocol):
    """Predicts p(category | prompt) from normalised prompt vectors."""

    categories: list[str]

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray: ...


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = logits / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    weights = np.exp(scaled)
    return weights / weights.sum(axis=1, keepdims=True)


def _check_training_data(vectors: np.ndarray, labels: list[str]) -> list[str]:
    if vectors.ndim != 2 or len(vectors) != len(labels):
        raise ValueError(
            f"need one label per vector: got {len(labels)} labels for shape {vectors.shape}"
        )
    if not labels:
        raise ValueError("need at least one labelled example")
    return sorted(set(labels))


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class CentroidClassifier:
    """Nearest centroid: each category is the mean of its examples' vectors."""

    def __init__(self, temperature: float = 0.05) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.categories: list[str] = []
        self.centroids = np.zeros((0, 0), dtype=np.float32)

    def fit(self, vectors: np.ndarray, labels: list[str]) -> CentroidClassifier:
        self.categories = _check_training_data(vectors, labels)
        label_array = np.asarray(labels)
        centroids = [vectors[label_array == c].mean(axis=0) for c in self.categories]
        self.centroids = _normalise(np.stack(centroids)).astype(np.float32)
        return self

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        if not self.categories:
            raise RuntimeError("CentroidClassifier.predict_proba called before fit")
        return softmax(vectors @ self.centroids.T, self.temperature)


class KNNClassifier:
    """k nearest examples vote for their categories, weighted by softmax(similarity)."""

    def __init__(self, k: int = 5, temperature: float = 0.05) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.k = k
        self.temperature = temperature
        self.categories: list[str] = []
        self.examples = np.zeros((0, 0), dtype=np.float32)
        self.example_labels = np.zeros(0, dtype=np.int64)

    def fit(self, vectors: np.ndarray, labels: list[str]) -> KNNClassifier:
        self.categories = _check_training_data(vectors, labels)
        index = {c: i for i, c in enumerate(self.categories)}
        self.examples = _normalise(vectors).astype(np.float32)
        self.example_labels = np.array([index[label] for label in labels], dtype=np.int64)
        return self

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        if not self.categories:
            raise RuntimeError("KNNClassifier.predict_proba called before fit")
        similarities = vectors @ self.examples.T
        k = min(self.k, similarities.shape[1])
        nearest = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
        nearest_sims = np.take_along_axis(similarities, nearest, axis=1)
        weights = softmax(nearest_sims, self.temperature)
        probabilities = np.zeros((len(vectors), len(self.categories)), dtype=np.float64)
        for row in range(len(vectors)):
            np.add.at(probabilities[row], self.example_labels[nearest[row]], weights[row])
        return probabilities
