"""MMLU-Pro questions with the recorded correctness of many models, as one validated object.

A dataset directory holds three files (the format of ../shared/data/mmlu_pro/):

- `questions.jsonl`: `question_id`, `category`, `question`, `options` (+ `src`, `answer`)
- `correctness.csv`: `question_id`, `category`, `src`, then one 0/1 column per model;
  an empty cell means no answer was recorded and counts as wrong
- `models.csv`: `model`, `total_params_b`, `active_params_b`, `architecture`; empty sizes
  for closed models

`stratified_split` makes a seeded, per-category split and `write_dataset` writes each
part back in the same format, so any tool that reads a dataset directory can be run on
a held-out part.

    python -m router.training.mmlu_pro split --source ../shared/data/mmlu_pro \
        --train out/train --test out/test --test-fraction 0.2 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from router.jsonl import json_objects

QUESTIONS_FILE = "questions.jsonl"
CORRECTNESS_FILE = "correctness.csv"
MODELS_FILE = "models.csv"
QUESTION_FIELDS = ("question_id", "category", "question", "options")
CORRECTNESS_KEY_COLUMNS = ("question_id", "category", "src")
MODEL_COLUMNS = ("model", "total_params_b", "active_params_b", "architecture")
OPTION_LETTERS = "ABCDEFGHIJKLMNOP"


class DatasetError(ValueError):
    """A dataset directory is missing a file or holds a malformed one."""


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    src: str
    question: str
    options: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    total_params_b: float  # NaN when unknown (closed models)
    active_params_b: float  # NaN when unknown
    architecture: str


@dataclass(frozen=True)
class MMLUProData:
    """Questions, models, and which model answered which question correctly."""

    questions: tuple[Question, ...]
    models: tuple[ModelInfo, ...]  # every row of models.csv, in file order
    experts: tuple[str, ...]  # the correctness columns, in file order
    correctness: np.ndarray  # (N, E) float 0/1; a missing record is 0
    recorded: np.ndarray  # (N, E) bool; False where the cell was empty

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def categories(self) -> list[str]:
        return [q.category for q in self.questions]

    @property
    def active_params_b(self) -> np.ndarray:
        """(E,) active parameters of each correctness column, NaN where unknown."""
        by_name = {m.name: m.active_params_b for m in self.models}
        return np.array([by_name[e] for e in self.experts], dtype=np.float64)

    def prompts(self, with_options: bool = True) -> list[str]:
        """The text a user would send: the question, and by default its lettered options."""
        return [format_prompt(q, with_options) for q in self.questions]

    def subset(self, indices: Sequence[int] | np.ndarray) -> MMLUProData:
        rows = np.asarray(indices, dtype=np.int64)
        return MMLUProData(
            questions=tuple(self.questions[i] for i in rows),
            models=self.models,
            experts=self.experts,
            correctness=self.correctness[rows],
            recorded=self.recorded[rows],
        )


def format_prompt(question: Question, with_options: bool = True) -> str:
    if not with_options or not question.options:
        return question.question
    lines = [f"{OPTION_LETTERS[i]}. {text}" for i, text in enumerate(question.options)]
    return question.question + "\n\nOptions:\n" + "\n".join(lines)


def load_dataset(directory: Path) -> MMLUProData:
    """Read and cross-check a dataset directory; every problem is a `DatasetError`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"dataset directory {directory} does not exist")
    questions = _read_questions(_require(directory / QUESTIONS_FILE))
    models = _read_models(_require(directory / MODELS_FILE))
    experts, correctness, recorded = _read_correctness(
        _require(directory / CORRECTNESS_FILE), questions
    )
    known = {m.name for m in models}
    unknown = [e for e in experts if e not in known]
    if unknown:
        raise DatasetError(
            f"{directory / CORRECTNESS_FILE} has model columns missing from "
            f"{MODELS_FILE}: {unknown}"
        )
    return MMLUProData(tuple(questions), tuple(models), tuple(experts), correctness, recorded)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(f"missing dataset file {path}")
    return path


def _read_questions(path: Path) -> list[Question]:
    questions: list[Question] = []
    seen: set[str] = set()
    for number, record in json_objects(path, DatasetError):
        missing = [f for f in QUESTION_FIELDS if f not in record]
        if missing:
            raise DatasetError(f"{path}:{number}: missing field(s) {missing}")
        options = record["options"]
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise DatasetError(f"{path}:{number}: 'options' must be a list of strings")
        if len(options) > len(OPTION_LETTERS):
            raise DatasetError(f"{path}:{number}: {len(options)} options, at most 16")
        question_id = str(record["question_id"])
        if question_id in seen:
            raise DatasetError(f"{path}:{number}: duplicate question_id {question_id!r}")
        seen.add(question_id)
        questions.append(
            Question(
                question_id=question_id,
                category=str(record["category"]),
                src=str(record.get("src", "")),
                question=str(record["question"]),
                options=tuple(options),
                answer=str(record.get("answer", "")),
            )
        )
    if not questions:
        raise DatasetError(f"{path} holds no questions")
    return questions


def _parse_size(path: Path, model: str, column: str, cell: str) -> float:
    if not cell.strip():
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        raise DatasetError(f"{path}: model {model!r} has non-numeric {column} {cell!r}") from None
    if not value > 0:
        raise DatasetError(f"{path}: model {model!r} has {column} {value}, must be > 0")
    return value


def _read_models(path: Path) -> list[ModelInfo]:
    with path.open(encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream)
        columns = reader.fieldnames or []
        missing = [c for c in ("model", "active_params_b") if c not in columns]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing}; found {columns}")
        models = []
        for row in reader:
            name = row["model"].strip()
            if not name:
                raise DatasetError(f"{path}: a row has an empty model name")
            models.append(
                ModelInfo(
                    name=name,
                    total_params_b=_parse_size(
                        path, name, "total_params_b", row.get("total_params_b") or ""
                    ),
                    active_params_b=_parse_size(
                        path, name, "active_params_b", row["active_params_b"] or ""
                    ),
                    architecture=(row.get("architecture") or "").strip(),
                )
            )
    if not models:
        raise DatasetError(f"{path} lists no models")
    return models


def _read_correctness(
    path: Path, questions: list[Question]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    with path.open(encoding="utf-8", newline="") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path} is empty")
        missing = [c for c in ("question_id", "category") if c not in header]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing}; found {header[:5]}")
        model_columns = [i for i, c in enumerate(header) if c not in CORRECTNESS_KEY_COLUMNS]
        if not model_columns:
            raise DatasetError(f"{path} has no model columns")
        experts = [header[i] for i in model_columns]
        id_column, category_column = header.index("question_id"), header.index("category")
        row_of = {q.question_id: i for i, q in enumerate(questions)}
        correctness = np.zeros((len(questions), len(experts)), dtype=np.float64)
        recorded = np.zeros((len(questions), len(experts)), dtype=bool)
        filled: set[str] = set()
        for number, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DatasetError(f"{path}:{number}: {len(row)} cells, header has {len(header)}")
            question_id = row[id_column]
            if question_id not in row_of:
                raise DatasetError(
                    f"{path}:{number}: question_id {question_id!r} is not in {QUESTIONS_FILE}"
                )
            if question_id in filled:
                raise DatasetError(f"{path}:{number}: duplicate question_id {question_id!r}")
            index = row_of[question_id]
            if row[category_column] != questions[index].category:
                raise DatasetError(
                    f"{path}:{number}: question {question_id!r} has category "
                    f"{row[category_column]!r} here and {questions[index].category!r} "
                    f"in {QUESTIONS_FILE}"
                )
            for column, cell in enumerate(row[i] for i in model_columns):
                value = _parse_cell(path, number, experts[column], cell)
                if value is not None:
                    correctness[index, column] = value
                    recorded[index, column] = True
            filled.add(question_id)
    absent = [q.question_id for q in questions if q.question_id not in filled]
    if absent:
        raise DatasetError(
            f"{path} has no row for {len(absent)} question(s) of {QUESTIONS_FILE}, "
            f"e.g. {absent[:3]}"
        )
    return experts, correctness, recorded


def _parse_cell(path: Path, number: int, expert: str, cell: str) -> float | None:
    text = cell.strip()
    if not text:
        return None  # no answer recorded: wrong, and marked as not recorded
    if text in ("1", "1.0"):
        return 1.0
    if text in ("0", "0.0"):
        return 0.0
    raise DatasetError(f"{path}:{number}: model {expert!r} has cell {cell!r}; expected 0, 1 or ''")


def write_dataset(data: MMLUProData, directory: Path) -> None:
    """Write `data` as a dataset directory that `load_dataset` reads back unchanged."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / QUESTIONS_FILE).open("w", encoding="utf-8") as stream:
        for q in data.questions:
            record: dict[str, Any] = {
                "question_id": q.question_id,
                "category": q.category,
                "src": q.src,
                "question": q.question,
                "options": list(q.options),
                "answer": q.answer,
            }
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    with (directory / CORRECTNESS_FILE).open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow([*CORRECTNESS_KEY_COLUMNS, *data.experts])
        for q, values, recorded in zip(
            data.questions, data.correctness, data.recorded, strict=True
        ):
            cells = [str(int(v)) if r else "" for v, r in zip(values, recorded, strict=True)]
            writer.writerow([q.question_id, q.category, q.src, *cells])
    with (directory / MODELS_FILE).open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(MODEL_COLUMNS)
        for m in data.models:
            writer.writerow(
                [m.name, _size(m.total_params_b), _size(m.active_params_b), m.architecture]
            )


def _size(value: float) -> str:
    return "" if math.isnan(value) else f"{value:g}"


def stratified_split(
    labels: Sequence[str], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-label split: (train rows, test rows), each in the input order.

    Every label keeps round(test_fraction * count) rows for test (at least one row on
    each side when it has two or more), so each category is represented in both parts.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not labels:
        raise ValueError("cannot split an empty list of labels")
    rng = np.random.default_rng(seed)
    label_array = np.asarray(labels)
    test_rows: list[np.ndarray] = []
    for label in sorted(set(labels)):
        rows = np.flatnonzero(label_array == label)
        count = round(test_fraction * len(rows))
        if len(rows) >= 2:
            count = min(max(count, 1), len(rows) - 1)
        test_rows.append(rng.permutation(rows)[:count])
    test = np.sort(np.concatenate(test_rows))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def split_dataset(
    data: MMLUProData, test_fraction: float, seed: int
) -> tuple[MMLUProData, MMLUProData]:
    train, test = stratified_split(data.categories, test_fraction, seed)
    return data.subset(train), data.subset(test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.training.mmlu_pro", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    split = commands.add_parser("split", help="write a seeded stratified train/test split")
    split.add_argument("--source", type=Path, required=True, help="dataset directory to split")
    split.add_argument("--train", type=Path, required=True, help="output directory for train")
    split.add_argument("--test", type=Path, required=True, help="output directory for test")
    split.add_argument("--test-fraction", type=float, default=0.2)
    split.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        data = load_dataset(args.source)
        train, test = split_dataset(data, args.test_fraction, args.seed)
    except (DatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_dataset(train, args.train)
    write_dataset(test, args.test)
    print(f"train: {len(train)} questions -> {args.train}")
    print(f"test:  {len(test)} questions -> {args.test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
