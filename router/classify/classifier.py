"""Category classifiers over embedding vectors: p(category | prompt vector).

Three kinds share one interface (fit, predict_proba, with_category, save):

- `LogisticClassifier` ("logreg", the default): multinomial logistic regression.
- `KNNClassifier` ("knn"): the k nearest training examples vote.
- `CentroidClassifier` ("centroid"): nearest category mean; the few-shot classifier.

Every kind has a softmax `temperature`, so `router.training.classifier_fit.fit_temperature`
can calibrate any of them on held-out data, and the router's confidence (the top
probability) means the same thing whichever kind is configured. `with_category` adds a
category from a handful of example vectors without refitting the existing ones. Saved
classifiers are a JSON file plus an `.npz` of arrays (no pickle); `load_classifier`
dispatches on the saved kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from scipy.optimize import minimize

METADATA_FILE = "classifier.json"
ARRAYS_FILE = "arrays.npz"
FORMAT_VERSION = 1


class ClassifierLoadError(ValueError):
    """A saved classifier directory is missing or malformed."""


class CategoryClassifier(Protocol):
    """Predicts p(category | prompt) from normalised prompt vectors."""

    categories: list[str]

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray: ...


class TrainableClassifier(CategoryClassifier, Protocol):
    """What `training` and `load_classifier` need beyond prediction."""

    kind: str
    temperature: float

    def fit(self, vectors: np.ndarray, labels: list[str]) -> TrainableClassifier: ...

    def with_category(self, name: str, example_vectors: np.ndarray) -> TrainableClassifier: ...

    def save(self, directory: Path) -> None: ...


class OneCategoryClassifier:
    """The classifier of a category space with a single category: every prompt is in it
    with probability 1, whatever its vector, so nothing needs fitting or embedding."""

    def __init__(self, category: str) -> None:
        self.categories = [category]

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        return np.ones((len(vectors), 1))


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = logits / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    weights = np.exp(scaled)
    return weights / weights.sum(axis=1, keepdims=True)


def check_training_data(vectors: np.ndarray, labels: list[str]) -> list[str]:
    if vectors.ndim != 2 or len(vectors) != len(labels):
        raise ValueError(
            f"need one label per vector: got {len(labels)} labels for shape {vectors.shape}"
        )
    if not labels:
        raise ValueError("need at least one labelled example")
    return sorted(set(labels))


def check_new_category(categories: list[str], name: str, vectors: np.ndarray, dim: int) -> None:
    if not name:
        raise ValueError("a new category needs a non-empty name")
    if name in categories:
        raise ValueError(f"category {name!r} already exists; known: {categories}")
    if vectors.ndim != 2 or len(vectors) == 0 or vectors.shape[1] != dim:
        raise ValueError(
            f"category {name!r} needs example vectors of shape (n >= 1, {dim}), got {vectors.shape}"
        )


def _check_queries(categories: list[str], vectors: np.ndarray, dim: int, kind: str) -> None:
    if not categories:
        raise RuntimeError(f"{kind}.predict_proba called before fit")
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"{kind} expects vectors of shape (n, {dim}), got {vectors.shape}")


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def label_indices(categories: list[str], labels: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(categories)}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        raise ValueError(f"unknown categor(ies) {unknown}; the classifier knows {categories}")
    return np.array([index[label] for label in labels], dtype=np.int64)


class CentroidClassifier:
    """Nearest centroid: each category is the mean of its examples' vectors."""

    kind = "centroid"

    def __init__(self, temperature: float = 0.05) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.categories: list[str] = []
        self.centroids = np.zeros((0, 0), dtype=np.float32)

    def fit(self, vectors: np.ndarray, labels: list[str]) -> CentroidClassifier:
        self.categories = check_training_data(vectors, labels)
        label_array = np.asarray(labels)
        centroids = [vectors[label_array == c].mean(axis=0) for c in self.categories]
        self.centroids = _normalise(np.stack(centroids)).astype(np.float32)
        return self

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        _check_queries(self.categories, vectors, self.centroids.shape[1], "CentroidClassifier")
        return softmax(vectors @ self.centroids.T, self.temperature)

    def with_category(self, name: str, example_vectors: np.ndarray) -> CentroidClassifier:
        check_new_category(self.categories, name, example_vectors, self.centroids.shape[1])
        extended = CentroidClassifier(self.temperature)
        extended.categories = [*self.categories, name]
        centroid = _normalise(example_vectors.mean(axis=0, keepdims=True))
        extended.centroids = np.vstack([self.centroids, centroid]).astype(np.float32)
        return extended

    def save(self, directory: Path) -> None:
        _write(
            directory,
            self.kind,
            self.categories,
            {"temperature": self.temperature},
            {"centroids": self.centroids},
        )

    @classmethod
    def from_saved(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> CentroidClassifier:
        loaded = cls(float(meta["temperature"]))
        loaded.categories = list(meta["categories"])
        loaded.centroids = arrays["centroids"].astype(np.float32)
        _check_rows(loaded.centroids, loaded.categories, "centroids")
        return loaded


class KNNClassifier:
    """k nearest examples vote for their categories, weighted by softmax(similarity)."""

    kind = "knn"

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
        self.categories = check_training_data(vectors, labels)
        self.examples = _normalise(vectors).astype(np.float32)
        self.example_labels = label_indices(self.categories, labels)
        return self

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        _check_queries(self.categories, vectors, self.examples.shape[1], "KNNClassifier")
        similarities = vectors @ self.examples.T
        k = min(self.k, similarities.shape[1])
        nearest = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
        nearest_sims = np.take_along_axis(similarities, nearest, axis=1)
        weights = softmax(nearest_sims, self.temperature)
        probabilities = np.zeros((len(vectors), len(self.categories)), dtype=np.float64)
        rows = np.repeat(np.arange(len(vectors)), k)
        np.add.at(probabilities, (rows, self.example_labels[nearest].ravel()), weights.ravel())
        return probabilities

    def with_category(self, name: str, example_vectors: np.ndarray) -> KNNClassifier:
        check_new_category(self.categories, name, example_vectors, self.examples.shape[1])
        extended = KNNClassifier(self.k, self.temperature)
        extended.categories = [*self.categories, name]
        new = _normalise(example_vectors).astype(np.float32)
        extended.examples = np.vstack([self.examples, new])
        new_labels = np.full(len(new), len(self.categories), dtype=np.int64)
        extended.example_labels = np.concatenate([self.example_labels, new_labels])
        return extended

    def save(self, directory: Path) -> None:
        _write(
            directory,
            self.kind,
            self.categories,
            {"k": self.k, "temperature": self.temperature},
            {"examples": self.examples, "example_labels": self.example_labels},
        )

    @classmethod
    def from_saved(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> KNNClassifier:
        loaded = cls(int(meta["k"]), float(meta["temperature"]))
        loaded.categories = list(meta["categories"])
        loaded.examples = arrays["examples"].astype(np.float32)
        loaded.example_labels = arrays["example_labels"].astype(np.int64)
        if len(loaded.examples) != len(loaded.example_labels):
            raise ClassifierLoadError("knn examples and example_labels differ in length")
        if loaded.example_labels.size and not (
            loaded.example_labels.min() >= 0
            and loaded.example_labels.max() < len(loaded.categories)
        ):
            raise ClassifierLoadError("knn example_labels point outside the category list")
        return loaded


class LogisticClassifier:
    """Multinomial logistic regression: logits = W x + b, probabilities = softmax(logits / T).

    A few training vectors per category are kept as anchors: `with_category` fits only
    the new category's row against them, the existing rows stay exactly as they were.
    """

    kind = "logreg"

    def __init__(
        self,
        regularisation: float = 10.0,
        temperature: float = 1.0,
        max_iter: int = 2000,
        anchors_per_category: int = 64,
        seed: int = 0,
    ) -> None:
        if regularisation <= 0:
            raise ValueError(
                f"regularisation (inverse strength C) must be > 0, got {regularisation}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.regularisation = regularisation
        self.temperature = temperature
        self.max_iter = max_iter
        self.anchors_per_category = anchors_per_category
        self.seed = seed
        self.categories: list[str] = []
        self.weights = np.zeros((0, 0), dtype=np.float64)
        self.bias = np.zeros(0, dtype=np.float64)
        self.anchors = np.zeros((0, 0), dtype=np.float32)
        self.anchor_labels = np.zeros(0, dtype=np.int64)

    def fit(self, vectors: np.ndarray, labels: list[str]) -> LogisticClassifier:
        from sklearn.linear_model import LogisticRegression

        categories = check_training_data(vectors, labels)
        if len(categories) < 2:
            raise ValueError(f"logistic regression needs at least two categories, got {categories}")
        targets = label_indices(categories, labels)
        model = LogisticRegression(C=self.regularisation, max_iter=self.max_iter)
        model.fit(vectors, targets)
        self.categories = categories
        self.weights = np.asarray(model.coef_, dtype=np.float64)
        self.bias = np.asarray(model.intercept_, dtype=np.float64)
        if len(categories) == 2:  # sklearn keeps one row for two classes; make it a softmax pair
            self.weights = np.vstack([-self.weights / 2, self.weights / 2])
            self.bias = np.array([-self.bias[0] / 2, self.bias[0] / 2])
        rng = np.random.default_rng(self.seed)
        keep = np.concatenate(
            [
                rng.permutation(np.flatnonzero(targets == c))[: self.anchors_per_category]
                for c in range(len(categories))
            ]
        )
        self.anchors = np.asarray(vectors[keep], dtype=np.float32)
        self.anchor_labels = targets[keep]
        return self

    def logits(self, vectors: np.ndarray) -> np.ndarray:
        _check_queries(self.categories, vectors, self.weights.shape[1], "LogisticClassifier")
        return np.asarray(vectors @ self.weights.T + self.bias, dtype=np.float64)

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        return softmax(self.logits(vectors), self.temperature)

    def with_category(self, name: str, example_vectors: np.ndarray) -> LogisticClassifier:
        check_new_category(self.categories, name, example_vectors, self.weights.shape[1])
        examples = np.asarray(example_vectors, dtype=np.float64)
        inputs = np.vstack([self.anchors.astype(np.float64), examples])
        own_labels = np.concatenate([self.anchor_labels, np.full(len(examples), -1)])
        row, bias = fit_new_row(inputs, self.logits(inputs), own_labels, self.regularisation)
        extended = LogisticClassifier(
            self.regularisation,
            self.temperature,
            self.max_iter,
            self.anchors_per_category,
            self.seed,
        )
        extended.categories = [*self.categories, name]
        extended.weights = np.vstack([self.weights, row])
        extended.bias = np.append(self.bias, bias)
        kept = examples[: self.anchors_per_category].astype(np.float32)
        extended.anchors = np.vstack([self.anchors, kept])
        new_labels = np.full(len(kept), len(self.categories), dtype=np.int64)
        extended.anchor_labels = np.concatenate([self.anchor_labels, new_labels])
        return extended

    def save(self, directory: Path) -> None:
        params = {
            "regularisation": self.regularisation,
            "temperature": self.temperature,
            "max_iter": self.max_iter,
            "anchors_per_category": self.anchors_per_category,
            "seed": self.seed,
        }
        arrays: dict[str, np.ndarray] = {
            "weights": self.weights,
            "bias": self.bias,
            "anchors": self.anchors,
            "anchor_labels": self.anchor_labels,
        }
        _write(directory, self.kind, self.categories, params, arrays)

    @classmethod
    def from_saved(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> LogisticClassifier:
        loaded = cls(
            float(meta["regularisation"]),
            float(meta["temperature"]),
            int(meta["max_iter"]),
            int(meta["anchors_per_category"]),
            int(meta["seed"]),
        )
        loaded.categories = list(meta["categories"])
        loaded.weights = arrays["weights"].astype(np.float64)
        loaded.bias = arrays["bias"].astype(np.float64)
        loaded.anchors = arrays["anchors"].astype(np.float32)
        loaded.anchor_labels = arrays["anchor_labels"].astype(np.int64)
        _check_rows(loaded.weights, loaded.categories, "weights")
        _check_rows(loaded.bias[:, None], loaded.categories, "bias")
        return loaded


def fit_new_row(
    inputs: Any, fixed_logits: np.ndarray, own_labels: np.ndarray, regularisation: float
) -> tuple[np.ndarray, float]:
    """One new softmax row (w, b) with every existing row frozen.

    `inputs` (dense or scipy sparse) are anchors of the existing categories, whose own
    category index is in `own_labels`, followed by examples of the new category, marked
    by -1. Minimises the mean cross-entropy of each group (the two weighted equally) plus
    the L2 penalty of the original fit. Convex in (w, b), so L-BFGS finds the optimum.
    """
    is_new = (own_labels < 0).astype(np.float64)
    count_e = int(is_new.sum())
    count_a = len(own_labels) - count_e
    if count_e == 0:
        raise ValueError("need at least one example of the new category")
    weight = np.where(is_new == 1, 0.5 / count_e, 0.5 / max(count_a, 1))
    rows = np.arange(len(own_labels))
    own = np.where(is_new == 1, 0.0, fixed_logits[rows, np.maximum(own_labels, 0)])
    penalty = 1.0 / (regularisation * len(own_labels))

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = params[:-1], params[-1]
        new_logit = np.asarray(inputs @ w).ravel() + b
        top = np.maximum(fixed_logits.max(axis=1), new_logit)
        total = np.exp(fixed_logits - top[:, None]).sum(axis=1) + np.exp(new_logit - top)
        log_norm = top + np.log(total)
        target_logit = np.where(is_new == 1, new_logit, own)
        value = float(weight @ (log_norm - target_logit) + 0.5 * penalty * w @ w)
        residual = weight * (np.exp(new_logit - log_norm) - is_new)
        gradient = np.append(np.asarray(inputs.T @ residual).ravel() + penalty * w, residual.sum())
        return value, gradient

    start = np.zeros(inputs.shape[1] + 1)
    result = minimize(loss, start, jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return np.asarray(result.x[:-1]), float(result.x[-1])


def _check_rows(array: np.ndarray, categories: list[str], name: str) -> None:
    if array.ndim != 2 or len(array) != len(categories):
        raise ClassifierLoadError(
            f"saved {name} has shape {array.shape}, expected one row per category "
            f"({len(categories)})"
        )


def _write(
    directory: Path,
    kind: str,
    categories: list[str],
    params: dict[str, Any],
    arrays: dict[str, np.ndarray],
) -> None:
    if not categories:
        raise RuntimeError(f"cannot save an unfitted {kind} classifier")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / ARRAYS_FILE, **arrays)  # type: ignore[arg-type]
    meta = {"kind": kind, "format_version": FORMAT_VERSION, "categories": categories, **params}
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_saved(directory: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON metadata and the arrays of a saved classifier directory."""
    directory = Path(directory)
    meta_path, arrays_path = directory / METADATA_FILE, directory / ARRAYS_FILE
    for path in (meta_path, arrays_path):
        if not path.is_file():
            raise ClassifierLoadError(f"saved classifier file {path} does not exist")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        with np.load(arrays_path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (OSError, ValueError) as error:
        raise ClassifierLoadError(
            f"cannot read saved classifier in {directory}: {error}"
        ) from error
    if not isinstance(meta, dict) or "kind" not in meta or "categories" not in meta:
        raise ClassifierLoadError(f"{meta_path} needs 'kind' and 'categories'")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ClassifierLoadError(
            f"{meta_path} has format_version {meta.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}"
        )
    return meta, arrays


CLASSIFIER_KINDS: dict[str, Any] = {
    LogisticClassifier.kind: LogisticClassifier,
    KNNClassifier.kind: KNNClassifier,
    CentroidClassifier.kind: CentroidClassifier,
}


def make_classifier(kind: str, **params: Any) -> TrainableClassifier:
    try:
        cls = CLASSIFIER_KINDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown classifier kind {kind!r}; known: {sorted(CLASSIFIER_KINDS)}"
        ) from None
    made: TrainableClassifier = cls(**params)
    return made


def load_classifier(directory: Path) -> TrainableClassifier:
    """A vector classifier saved by its `save` (router.classify.loading.load_router_classifier
    also reads the text kind)."""
    meta, arrays = read_saved(directory)
    kind = meta["kind"]
    if kind not in CLASSIFIER_KINDS:
        raise ClassifierLoadError(
            f"{Path(directory) / METADATA_FILE} has unknown kind {kind!r}; "
            f"known: {sorted(CLASSIFIER_KINDS)}; text-logreg loads with load_router_classifier"
        )
    try:
        loaded: TrainableClassifier = CLASSIFIER_KINDS[kind].from_saved(meta, arrays)
    except KeyError as error:
        raise ClassifierLoadError(f"saved {kind} classifier lacks {error.args[0]!r}") from None
    return loaded
