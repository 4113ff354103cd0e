"""Training vector classifiers: labelled data, argument checks and temperature calibration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.classify.classifier import LogisticClassifier
from router.training.classifier_fit import (
    TrainingDataError,
    expected_calibration_error,
    fit_temperature,
    load_labelled_jsonl,
    train_classifier,
)
from tests.unit.router.classify.test_classifier import CATEGORIES, blobs


def test_temperature_calibration_reduces_log_loss_and_overconfidence() -> None:
    vectors, labels = blobs(80, seed=2, spread=0.9)
    held_vectors, held_labels = blobs(80, seed=3, spread=0.9)
    targets = np.array([CATEGORIES.index(label) for label in held_labels])
    # Deliberately overconfident: a tiny temperature makes every prediction near 1.
    classifier = LogisticClassifier(temperature=0.05).fit(vectors, labels)

    def log_loss() -> float:
        p = classifier.predict_proba(held_vectors)[np.arange(len(targets)), targets]
        return float(-np.log(np.clip(p, 1e-12, None)).mean())

    before_loss = log_loss()
    before_ece = expected_calibration_error(classifier.predict_proba(held_vectors), targets)
    temperature = fit_temperature(classifier, held_vectors, held_labels)
    assert temperature > 0.05 and classifier.temperature == temperature
    assert log_loss() < before_loss
    after_ece = expected_calibration_error(classifier.predict_proba(held_vectors), targets)
    assert after_ece < before_ece and after_ece < 0.1


def test_expected_calibration_error_of_known_cases() -> None:
    certain_right = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(certain_right, np.array([0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(certain_right, np.array([1, 0])) == pytest.approx(1.0)


def test_load_labelled_jsonl_accepts_prompt_or_question(tmp_path: Path) -> None:
    path = tmp_path / "labelled.jsonl"
    records = [
        {"prompt": "what is 2+2", "category": "math"},
        {"question": "Is this a tort?", "options": ["yes", "no"], "category": "law"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    loaded = load_labelled_jsonl(path)
    assert loaded.labels == ["math", "law"] and loaded.categories == ["law", "math"]
    assert loaded.texts[0] == "what is 2+2"
    assert loaded.texts[1] == "Is this a tort?\n\nOptions:\nA. yes\nB. no"
    assert load_labelled_jsonl(path, with_options=False).texts[1] == "Is this a tort?"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no labelled prompts"),
        ('{"category": "math"}\n', "needs a non-empty 'prompt' or 'question'"),
        ('{"prompt": "hi"}\n', "needs a non-empty 'category'"),
        ('{"prompt": "hi", "category": "art"}\n', "unknown category 'art'"),
        ("[1, 2]\n", "expected a JSON object"),
        ("{oops\n", "not valid JSON"),
    ],
)
def test_load_labelled_jsonl_bad_input(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TrainingDataError, match=message):
        load_labelled_jsonl(path, known_categories=["math", "law"])


def test_load_labelled_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="does not exist"):
        load_labelled_jsonl(tmp_path / "absent.jsonl")


def test_train_classifier_rejects_bad_arguments() -> None:
    vectors, labels = blobs(10, seed=0)
    with pytest.raises(ValueError, match="one label per vector"):
        train_classifier("logreg", vectors, labels[:-1])
    with pytest.raises(ValueError, match="calibration_fraction"):
        train_classifier("logreg", vectors, labels, calibration_fraction=1.0)
    with pytest.raises(ValueError, match="unknown classifier kind"):
        train_classifier("svm", vectors, labels)
