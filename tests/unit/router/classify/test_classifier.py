"""Category classifiers over vectors and over text: fit, predict, extend, save, load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.classify.classifier import (
    ClassifierLoadError,
    LogisticClassifier,
    TrainableClassifier,
    load_classifier,
    make_classifier,
)
from router.classify.features import TextClassifier, load_text_classifier
from router.classify.loading import load_router_classifier
from router.training.classifier_fit import train_classifier

CATEGORIES = ["alpha", "beta", "gamma"]


def blobs(per_class: int, seed: int, spread: float = 0.6) -> tuple[np.ndarray, list[str]]:
    """Overlapping unit-norm clusters around three directions (some rows are ambiguous)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:3]
    vectors, labels = [], []
    for index, name in enumerate(CATEGORIES):
        points = centres[index] + spread * rng.normal(size=(per_class, 8))
        vectors.append(points / np.linalg.norm(points, axis=1, keepdims=True))
        labels += [name] * per_class
    return np.vstack(vectors).astype(np.float32), labels


def accuracy(classifier: TrainableClassifier, vectors: np.ndarray, labels: list[str]) -> float:
    predicted = np.array(classifier.categories)[classifier.predict_proba(vectors).argmax(axis=1)]
    return float(np.mean(predicted == np.array(labels)))


@pytest.mark.parametrize("kind", ["logreg", "knn", "centroid"])
def test_train_predict_save_load_round_trip(kind: str, tmp_path: Path) -> None:
    vectors, labels = blobs(60, seed=0, spread=0.4)
    test_vectors, test_labels = blobs(30, seed=1, spread=0.4)
    classifier = train_classifier(kind, vectors, labels)
    assert classifier.kind == kind and classifier.categories == CATEGORIES
    probabilities = classifier.predict_proba(test_vectors)
    assert probabilities.shape == (90, 3)
    assert np.allclose(probabilities.sum(axis=1), 1.0) and (probabilities >= 0).all()
    assert accuracy(classifier, test_vectors, test_labels) > 0.8
    classifier.save(tmp_path / kind)
    meta = json.loads((tmp_path / kind / "classifier.json").read_text())
    assert meta["kind"] == kind
    loaded = load_classifier(tmp_path / kind)
    assert type(loaded) is type(classifier) and loaded.categories == classifier.categories
    assert loaded.temperature == pytest.approx(classifier.temperature)
    assert np.allclose(loaded.predict_proba(test_vectors), probabilities, atol=1e-6)


@pytest.mark.parametrize("kind", ["logreg", "knn", "centroid"])
def test_with_category_adds_a_class_without_touching_the_others(kind: str) -> None:
    vectors, labels = blobs(60, seed=4, spread=0.3)
    classifier = make_classifier(kind).fit(vectors, labels)
    rng = np.random.default_rng(5)
    new_direction = np.eye(8)[5]
    examples = new_direction + 0.2 * rng.normal(size=(6, 8))
    examples /= np.linalg.norm(examples, axis=1, keepdims=True)
    extended = classifier.with_category("delta", examples)
    assert extended.categories == [*CATEGORIES, "delta"]
    assert classifier.categories == CATEGORIES  # the original is unchanged
    probe = new_direction + 0.2 * rng.normal(size=(20, 8))
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    assert accuracy(extended, probe, ["delta"] * 20) >= 0.9
    old_vectors, old_labels = blobs(30, seed=6, spread=0.3)
    assert (
        accuracy(extended, old_vectors, old_labels)
        >= accuracy(classifier, old_vectors, old_labels) - 0.05
    )
    if isinstance(classifier, LogisticClassifier):
        assert isinstance(extended, LogisticClassifier)
        assert np.array_equal(extended.weights[:3], classifier.weights)
        assert np.array_equal(extended.bias[:3], classifier.bias)
    with pytest.raises(ValueError, match="already exists"):
        extended.with_category("delta", examples)
    with pytest.raises(ValueError, match="example vectors of shape"):
        classifier.with_category("epsilon", np.zeros((2, 5)))


def test_extended_classifier_saves_and_loads(tmp_path: Path) -> None:
    vectors, labels = blobs(40, seed=7)
    extended = LogisticClassifier().fit(vectors, labels).with_category("delta", np.eye(8)[5:6])
    extended.save(tmp_path / "c")
    loaded = load_classifier(tmp_path / "c")
    assert loaded.categories == extended.categories
    assert np.allclose(loaded.predict_proba(vectors), extended.predict_proba(vectors))


TEXTS = {
    "alpha": "integral sum derivative equation",
    "beta": "contract tort statute court",
    "gamma": "cell protein gene enzyme",
}


def text_data(per_class: int, seed: int) -> tuple[list[str], np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for name, words in TEXTS.items():
        vocabulary = words.split()
        for _ in range(per_class):
            picked = rng.choice(vocabulary, size=3)
            texts.append(" ".join(picked) + f" filler{rng.integers(5)}")
            labels.append(name)
    vectors, _ = blobs(per_class, seed, spread=3.0)  # mostly noise: the words must carry it
    return texts, vectors, labels


def test_text_classifier_round_trip_and_live_category(tmp_path: Path) -> None:
    texts, vectors, labels = text_data(30, seed=0)
    test_texts, test_vectors, test_labels = text_data(10, seed=1)
    classifier = TextClassifier(min_df=1).fit(texts, vectors, labels)
    probabilities = classifier.predict_proba_texts(test_texts, test_vectors)
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    predicted = np.array(classifier.categories)[probabilities.argmax(axis=1)]
    assert np.mean(predicted == np.array(test_labels)) > 0.9
    classifier.save(tmp_path / "text")
    loaded = load_router_classifier(tmp_path / "text")
    assert isinstance(loaded, TextClassifier)
    assert np.allclose(loaded.predict_proba_texts(test_texts, test_vectors), probabilities)

    new_texts = ["poem rhyme verse", "verse poem stanza", "rhyme stanza poem"]
    new_vectors = np.asarray(blobs(1, seed=9)[0][: len(new_texts)])
    extended = loaded.with_category("delta", new_texts, new_vectors)
    assert np.array_equal(extended.weights[:3], loaded.weights)
    guess = extended.predict_proba_texts(["a poem with rhyme"], new_vectors[:1])
    assert extended.categories[int(guess.argmax())] == "delta"
    with pytest.raises(ClassifierLoadError, match="not 'text-logreg'"):
        LogisticClassifier().fit(vectors, labels).save(tmp_path / "lr")
        load_text_classifier(tmp_path / "lr")


def test_one_prompt_fast_path_agrees_with_the_batch_path() -> None:
    texts, vectors, labels = text_data(30, seed=0)
    classifier = TextClassifier(min_df=1, ngram_max=2).fit(texts, vectors, labels)
    probes = [*text_data(5, seed=3)[0], "", "UPPER case Words, punctuation!", "x y z"]
    probe_vectors = np.asarray(blobs(len(probes), seed=4)[0][: len(probes)])
    batch = classifier.logits(probes, probe_vectors)
    for i, text in enumerate(probes):
        one = classifier.logits([text], probe_vectors[i : i + 1])
        assert np.allclose(one[0], batch[i], atol=1e-9), text
        columns, values = classifier.tfidf.term_weights(text)
        row = classifier.tfidf.transform([text]).toarray()[0]
        dense = np.zeros_like(row)
        dense[columns] = values
        assert np.allclose(dense, row, atol=1e-12), text


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ClassifierLoadError, match="does not exist"):
        load_classifier(tmp_path / "absent")
    vectors, labels = blobs(10, seed=0)
    LogisticClassifier().fit(vectors, labels).save(tmp_path / "c")
    meta_path = tmp_path / "c" / "classifier.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "kind": "svm"}))
    with pytest.raises(ClassifierLoadError, match="unknown kind 'svm'"):
        load_classifier(tmp_path / "c")
    meta_path.write_text(json.dumps({**meta, "categories": ["only"]}))
    with pytest.raises(ClassifierLoadError, match="one row per category"):
        load_classifier(tmp_path / "c")
    with pytest.raises(ValueError, match="unknown classifier kind"):
        make_classifier("svm")


def test_prediction_rejects_wrong_dimension_and_unfitted() -> None:
    vectors, labels = blobs(10, seed=0)
    with pytest.raises(RuntimeError, match="before fit"):
        LogisticClassifier().predict_proba(vectors)
    with pytest.raises(ValueError, match="shape"):
        LogisticClassifier().fit(vectors, labels).predict_proba(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="two categories"):
        LogisticClassifier().fit(vectors[:5], ["alpha"] * 5)


def test_tfidf_keeps_every_word_when_no_word_is_shared() -> None:
    from router.classify.features import TfidfFeatures

    texts = ["sum two numbers", "python code", "integrate this", "sort a list"]
    words = TfidfFeatures(min_df=2).fit(texts)
    assert {"sum", "python", "sort"} <= set(words.vocabulary)
    with pytest.raises(ValueError, match="no word of two or more letters"):
        TfidfFeatures().fit(["? !", "1 + 2", "= ="])
