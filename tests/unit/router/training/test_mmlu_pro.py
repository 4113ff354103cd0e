"""The MMLU-Pro data set: loading, prompts, writing, stratified splits and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from router.training.mmlu_pro import (
    DatasetError,
    format_prompt,
    load_dataset,
    main,
    split_dataset,
    stratified_split,
    write_dataset,
)
from tests.conftest import PROJECT_ROOT

SHARED_MMLU = PROJECT_ROOT.parent / "shared" / "data" / "mmlu_pro"

TOPICS = {
    "math": "compute the sum and the integral of",
    "law": "is the contract a tort under the statute for",
    "biology": "the cell and its protein gene in",
}
# name, active params (None = closed), accuracy per topic
EXPERTS = [
    ("small", 5.0, {"math": 0.8, "law": 0.2, "biology": 0.3}),
    ("mid", 20.0, {"math": 0.3, "law": 0.8, "biology": 0.5}),
    ("big", 70.0, {"math": 0.6, "law": 0.6, "biology": 0.85}),
    ("closed", None, {"math": 0.9, "law": 0.9, "biology": 0.9}),
]


def write_synthetic_dataset(directory: Path, per_topic: int = 40, seed: int = 0) -> None:
    """A small dataset in the MMLU-Pro format whose topics differ by keywords and experts."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    questions, rows = [], []
    for topic, words in TOPICS.items():
        for i in range(per_topic):
            qid = f"{topic}-{i}"
            src = f"ori_mmlu-{topic}" if i % 2 else f"stemez-{topic}"
            questions.append(
                {
                    "question_id": qid,
                    "category": topic,
                    "src": src,
                    "question": f"Question {i}: {words} item {i}?",
                    "options": [f"option {k}" for k in range(4)],
                    "answer": "A",
                }
            )
            cells = []
            for name, _, accuracy in EXPERTS:
                missing = name == "closed" and i == 0
                cells.append("" if missing else str(int(rng.random() < accuracy[topic])))
            rows.append([qid, topic, src, *cells])
    with (directory / "questions.jsonl").open("w") as stream:
        for record in questions:
            stream.write(json.dumps(record) + "\n")
    with (directory / "correctness.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["question_id", "category", "src", *(name for name, _, _ in EXPERTS)])
        writer.writerows(rows)
    with (directory / "models.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["model", "total_params_b", "active_params_b", "architecture"])
        for name, size, _ in EXPERTS:
            cell = "" if size is None else str(size)
            writer.writerow([name, cell, cell, "closed" if size is None else "dense"])


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    write_synthetic_dataset(tmp_path / "data")
    return tmp_path / "data"


def test_loads_questions_correctness_and_sizes(dataset_dir: Path) -> None:
    data = load_dataset(dataset_dir)
    assert len(data) == 120
    assert data.experts == ("small", "mid", "big", "closed")
    assert np.isnan(data.active_params_b[3]) and data.active_params_b[0] == 5.0
    # An empty cell is a wrong answer, and is marked as not recorded.
    first = [q.question_id for q in data.questions].index("math-0")
    assert data.correctness[first, 3] == 0.0 and not data.recorded[first, 3]
    assert data.recorded[first, :3].all()
    assert set(np.unique(data.correctness)) <= {0.0, 1.0}


def test_prompt_includes_lettered_options(dataset_dir: Path) -> None:
    question = load_dataset(dataset_dir).questions[0]
    text = format_prompt(question)
    assert text.startswith(question.question) and "\nA. option 0\n" in text
    assert "D. option 3" in text
    assert format_prompt(question, with_options=False) == question.question


def test_write_then_load_is_unchanged(dataset_dir: Path, tmp_path: Path) -> None:
    data = load_dataset(dataset_dir)
    write_dataset(data, tmp_path / "copy")
    again = load_dataset(tmp_path / "copy")
    assert again.questions == data.questions and again.models == data.models
    assert np.array_equal(again.correctness, data.correctness)
    assert np.array_equal(again.recorded, data.recorded)


def test_split_is_seeded_stratified_and_disjoint(dataset_dir: Path) -> None:
    data = load_dataset(dataset_dir)
    train, test = stratified_split(data.categories, 0.25, seed=3)
    again_train, again_test = stratified_split(data.categories, 0.25, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert not np.array_equal(test, stratified_split(data.categories, 0.25, seed=4)[1])
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(data)
    test_categories = [data.categories[i] for i in test]
    assert {c: test_categories.count(c) for c in TOPICS} == {c: 10 for c in TOPICS}
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(data.categories, 1.0, seed=0)


def test_split_command_writes_loadable_directories(dataset_dir: Path, tmp_path: Path) -> None:
    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    argv = [
        "split",
        "--source",
        str(dataset_dir),
        "--train",
        str(train_dir),
        "--test",
        str(test_dir),
        "--test-fraction",
        "0.2",
        "--seed",
        "7",
    ]
    assert main(argv) == 0
    train, test = load_dataset(train_dir), load_dataset(test_dir)
    expected_train, expected_test = split_dataset(load_dataset(dataset_dir), 0.2, 7)
    assert train.questions == expected_train.questions
    assert test.questions == expected_test.questions
    assert main([*argv[:2], str(tmp_path / "nowhere"), *argv[3:]]) == 2


def _rewrite(path: Path, transform: object) -> None:
    assert callable(transform)
    path.write_text(transform(path.read_text()))


@pytest.mark.parametrize(
    ("file", "transform", "message"),
    [
        ("questions.jsonl", lambda t: "", "holds no questions"),
        ("questions.jsonl", lambda t: t.replace('"category"', '"topic"', 1), "missing field"),
        ("questions.jsonl", lambda t: t + "{not json\n", "not valid JSON"),
        ("correctness.csv", lambda t: t.replace("question_id", "qid", 1), "missing column"),
        ("correctness.csv", lambda t: t.replace(",1\n", ",yes\n", 1), "expected 0, 1"),
        ("correctness.csv", lambda t: "\n".join(t.splitlines()[:-1]) + "\n", "has no row"),
        ("correctness.csv", lambda t: t.replace("math-3,math", "math-3,law", 1), "category"),
        ("correctness.csv", lambda t: t.replace("closed", "mystery", 1), "missing from models"),
        ("models.csv", lambda t: t.replace("active_params_b", "active", 1), "missing column"),
        ("models.csv", lambda t: t.replace(",5.0,dense", ",five,dense", 1), "non-numeric"),
    ],
)
def test_bad_dataset_files_are_named_in_the_error(
    dataset_dir: Path, file: str, transform: object, message: str
) -> None:
    _rewrite(dataset_dir / file, transform)
    with pytest.raises(DatasetError, match=message):
        load_dataset(dataset_dir)


def test_missing_directory_or_file(dataset_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "absent")
    (dataset_dir / "models.csv").unlink()
    with pytest.raises(DatasetError, match=r"missing dataset file .*models\.csv"):
        load_dataset(dataset_dir)


def test_shared_dataset_loads() -> None:
    if not (SHARED_MMLU / "questions.jsonl").is_file():
        pytest.skip(f"shared MMLU-Pro data not found at {SHARED_MMLU}")
    data = load_dataset(SHARED_MMLU)
    assert len(data) == 8476 and len(set(data.categories)) == 14
    assert len(data.experts) == 29 and int(np.isnan(data.active_params_b).sum()) == 2
