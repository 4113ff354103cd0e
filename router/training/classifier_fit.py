"""Training a category classifier from labelled prompts.

Labelled prompts are JSONL, one object per line with the text in `prompt` (or in
`question`, plus its `options` when present, as MMLU-Pro stores them) and the label in
`category`. `train_classifier` fits any kind and calibrates its temperature on a
held-out part of the training data before refitting on all of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from router.classify.classifier import TrainableClassifier, label_indices, make_classifier
from router.jsonl import json_objects
from router.training.mmlu_pro import OPTION_LETTERS, stratified_split


class TrainingDataError(ValueError):
    """A labelled-prompt file is missing, empty or malformed."""


@dataclass(frozen=True)
class LabelledPrompts:
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def categories(self) -> list[str]:
        return sorted(set(self.labels))


def prompt_text(record: dict[str, Any], with_options: bool = True) -> str | None:
    """The text a user would send for one record; None when it has no text field."""
    if isinstance(record.get("prompt"), str):
        return str(record["prompt"])
    question = record.get("question")
    if not isinstance(question, str):
        return None
    options = record.get("options")
    if with_options and isinstance(options, list) and options:
        lines = [f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options[: len(OPTION_LETTERS)])]
        return question + "\n\nOptions:\n" + "\n".join(lines)
    return question


def load_labelled_jsonl(
    path: Path,
    known_categories: Iterable[str] | None = None,
    with_options: bool = True,
) -> LabelledPrompts:
    """Read `prompt`/`question` + `category` records; bad input raises `TrainingDataError`.

    With `known_categories`, a record whose category is not among them is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"labelled prompt file {path} does not exist")
    allowed = None if known_categories is None else set(known_categories)
    texts: list[str] = []
    labels: list[str] = []
    for number, record in json_objects(path, TrainingDataError):
        text = prompt_text(record, with_options)
        if text is None or not text.strip():
            raise TrainingDataError(
                f"{path}:{number}: needs a non-empty 'prompt' or 'question' string"
            )
        category = record.get("category")
        if not isinstance(category, str) or not category.strip():
            raise TrainingDataError(f"{path}:{number}: needs a non-empty 'category' string")
        if allowed is not None and category not in allowed:
            raise TrainingDataError(
                f"{path}:{number}: unknown category {category!r}; known: {sorted(allowed)}"
            )
        texts.append(text)
        labels.append(category)
    if not texts:
        raise TrainingDataError(f"{path} holds no labelled prompts")
    return LabelledPrompts(texts, labels)


def train_classifier(
    kind: str,
    vectors: np.ndarray,
    labels: list[str],
    calibration_fraction: float = 0.2,
    seed: int = 0,
    **params: Any,
) -> TrainableClassifier:
    """Fit a classifier of `kind` on all rows, with a temperature calibrated on held-out rows.

    The temperature is fitted on `calibration_fraction` of the rows (stratified, seeded)
    by a model trained on the rest; the final model is refitted on every row and keeps
    that temperature. `calibration_fraction=0` skips calibration.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) != len(labels):
        raise ValueError(
            f"need one label per vector: got {len(labels)} labels for shape {vectors.shape}"
        )
    if not labels:
        raise ValueError("need at least one labelled example")
    if not 0.0 <= calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in [0, 1), got {calibration_fraction}")
    temperature: float | None = None
    if calibration_fraction > 0 and len(set(labels)) >= 2:
        fit_rows, held_out = stratified_split(labels, calibration_fraction, seed)
        fit_labels = [labels[i] for i in fit_rows]
        held_labels = [labels[i] for i in held_out]
        # Calibrate only when every held-out label was seen in fitting (at least two rows each).
        if len(held_out) and set(held_labels) <= set(fit_labels) and len(set(fit_labels)) >= 2:
            probe = make_classifier(kind, **params).fit(vectors[fit_rows], fit_labels)
            temperature = fit_temperature(probe, vectors[held_out], held_labels)
    classifier = make_classifier(kind, **params).fit(vectors, labels)
    if temperature is not None:
        classifier.temperature = temperature
    return classifier


def fit_temperature(
    classifier: TrainableClassifier, vectors: np.ndarray, labels: list[str]
) -> float:
    """Set the classifier's temperature to minimise log loss on held-out (vectors, labels)."""
    targets = label_indices(classifier.categories, labels)
    if len(targets) == 0:
        raise ValueError("need at least one held-out example to fit a temperature")
    original = classifier.temperature

    def log_loss(log_temperature: float) -> float:
        classifier.temperature = float(np.exp(log_temperature))
        probabilities = classifier.predict_proba(vectors)[np.arange(len(targets)), targets]
        return float(-np.log(np.clip(probabilities, 1e-12, None)).mean())

    centre = float(np.log(original))
    result = minimize_scalar(log_loss, bounds=(centre - 7.0, centre + 7.0), method="bounded")
    classifier.temperature = float(np.exp(result.x))
    return classifier.temperature


def expected_calibration_error(
    probabilities: np.ndarray, targets: np.ndarray, bins: int = 10
) -> float:
    """Mean |confidence - accuracy| over equal-width confidence bins, weighted by bin size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    bucket = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = bucket == b
        if members.any():
            error += members.mean() * abs(confidence[members].mean() - correct[members].mean())
    return float(error)
