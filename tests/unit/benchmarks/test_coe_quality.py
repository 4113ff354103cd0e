from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.coe_quality import MODES, Settings, main, run_benchmark
from router.embed.embed_cache import CachedEmbedder
from router.training.mmlu_pro import DatasetError, load_dataset, split_dataset, write_dataset
from tests.unit.fakes import KeywordEmbedder
from tests.unit.router.training.test_mmlu_pro import write_synthetic_dataset

EMBEDDER = KeywordEmbedder(["sum", "integral", "contract", "tort", "cell", "protein"])
TOP_KEYS = {
    "router_accuracy",
    "budgets",
    "best_single_model",
    "best_single_accuracy",
    "best_single_active_params_b",
    "category_oracle_accuracy",
    "question_oracle_accuracy",
    "random_expert_accuracy",
}
BUDGET_KEYS = {"budget_b", "accuracy", "avg_active_params_b", "experts_used"}


@pytest.fixture
def split_dirs(tmp_path: Path) -> tuple[Path, Path]:
    write_synthetic_dataset(tmp_path / "all", per_topic=60)
    train, test = split_dataset(load_dataset(tmp_path / "all"), 0.3, seed=0)
    write_dataset(train, tmp_path / "train")
    write_dataset(test, tmp_path / "test")
    return tmp_path / "train", tmp_path / "test"


@pytest.mark.parametrize("classifier", ["text-logreg", "logreg"])
def test_benchmark_reports_every_key_and_respects_budgets(
    split_dirs: tuple[Path, Path], classifier: str
) -> None:
    train, test = (load_dataset(d) for d in split_dirs)
    result = run_benchmark(
        train,
        test,
        [15.0, 40.0],
        EMBEDDER,
        Settings(classifier=classifier, folds=3),
        progress=lambda _: None,
    )
    assert set(result) >= TOP_KEYS
    assert result["router_accuracy"] > 0.9  # keywords separate the topics
    # "big" is the best model with a known size; "closed" has none and is never chosen.
    assert result["best_single_model"] == "big" and result["best_single_active_params_b"] == 70
    test_big = test.correctness[:, test.experts.index("big")].mean()
    assert result["best_single_accuracy"] == pytest.approx(test_big)
    assert [entry["budget_b"] for entry in result["budgets"]] == [15.0, 40.0]
    for entry in result["budgets"]:
        assert set(entry) >= BUDGET_KEYS
        assert entry["avg_active_params_b"] <= entry["budget_b"]
        assert "closed" not in entry["experts_used"]
    for entries in result["modes"].values():
        for entry in entries:
            assert (
                entry.get("feasible") is False or entry["avg_active_params_b"] <= entry["budget_b"]
            )
    # Specialists beat the 70B generalist here at a fraction of its cost.
    assert result["budgets"][1]["accuracy"] > result["best_single_accuracy"]
    sized = test.correctness[:, :3]
    assert result["question_oracle_accuracy"] == pytest.approx(sized.max(axis=1).mean())
    assert result["random_expert_accuracy"] == pytest.approx(sized.mean())
    assert 0 <= result["category_oracle_accuracy"] <= result["question_oracle_accuracy"]


def test_subcategories_route_to_categories(split_dirs: tuple[Path, Path]) -> None:
    train, test = (load_dataset(d) for d in split_dirs)
    result = run_benchmark(
        train,
        test,
        [40.0],
        EMBEDDER,
        Settings(classifier="logreg", folds=3, subcategories=True),
        progress=lambda _: None,
    )
    assert result["classes"] == 6  # three topics x two source families
    assert result["router_accuracy"] > 0.9
    assert result["budgets"][0]["avg_active_params_b"] <= 40.0


def test_command_writes_json_and_plot(
    split_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from router.embed import embedder as embedder_module

    monkeypatch.setattr(embedder_module, "MiniLMEmbedder", lambda: EMBEDDER)
    out = tmp_path / "out.json"
    argv = [
        "--train",
        str(split_dirs[0]),
        "--test",
        str(split_dirs[1]),
        "--budget-b",
        "40",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "out.png"),
        "--classifier",
        "logreg",
        "--folds",
        "3",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(argv) == 0
    import json

    result = json.loads(out.read_text())
    assert set(result) >= TOP_KEYS and (tmp_path / "out.png").stat().st_size > 0
    assert result["embedding_cache"]["misses"] > 0
    assert main(argv) == 0  # a second run embeds nothing
    assert json.loads(out.read_text())["embedding_cache"]["misses"] == 0


def test_bad_inputs_give_clear_errors(
    split_dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_dir, test_dir = split_dirs
    out = str(tmp_path / "o.json")
    assert (
        main(
            [
                "--train",
                str(tmp_path / "nope"),
                "--test",
                str(test_dir),
                "--budget-b",
                "30",
                "--json",
                out,
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    (test_dir / "models.csv").unlink()
    assert (
        main(
            ["--train", str(train_dir), "--test", str(test_dir), "--budget-b", "30", "--json", out]
        )
        == 2
    )
    assert "models.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--train", str(train_dir), "--test", str(test_dir), "--json", out])


def test_unknown_test_category_is_rejected(split_dirs: tuple[Path, Path]) -> None:
    train, test = (load_dataset(d) for d in split_dirs)
    keep = [i for i, c in enumerate(train.categories) if c != "law"]
    with pytest.raises(DatasetError, match="never seen in train: \\['law'\\]"):
        run_benchmark(train.subset(keep), test, [40.0], EMBEDDER, progress=lambda _: None)


def test_embedding_cache_reuses_vectors_by_content(tmp_path: Path) -> None:
    cached = CachedEmbedder(EMBEDDER, tmp_path, namespace="keywords")
    first = cached.embed(["a sum", "a tort", "a sum"])
    assert cached.misses == 2 and cached.hits == 1
    fresh = CachedEmbedder(EMBEDDER, tmp_path, namespace="keywords")
    again = fresh.embed(["a tort", "a cell"])
    assert fresh.misses == 1 and fresh.hits == 1
    assert np.array_equal(again[0], first[1])
    assert np.allclose(again, EMBEDDER.embed(["a tort", "a cell"]))
    assert fresh.embed([]).shape == (0, EMBEDDER.dimension)
    other = CachedEmbedder(EMBEDDER, tmp_path, namespace="another model")
    other.embed(["a sum"])
    assert other.misses == 1  # a different model never reads these vectors
    assert not math.isnan(float(first.sum()))


class Interrupted(Exception):
    pass


def test_embedding_cache_reports_and_keeps_each_chunk(tmp_path: Path) -> None:
    lines: list[str] = []
    texts = [f"sum number {i}" for i in range(5)]
    cached = CachedEmbedder(EMBEDDER, tmp_path, "keywords", progress=lines.append, chunk_size=2)
    vectors = cached.embed(texts)
    assert np.allclose(vectors, EMBEDDER.embed(texts))
    assert lines == [f"embedded {n}/5 new texts (cached from now on)" for n in (2, 4, 5)]

    def fail_on_third_chunk(line: str) -> None:
        if line.startswith("embedded 6/"):
            raise Interrupted

    more = [f"tort case {i}" for i in range(7)]
    interrupted = CachedEmbedder(EMBEDDER, tmp_path, "keywords", fail_on_third_chunk, 3)
    with pytest.raises(Interrupted):
        interrupted.embed(more)
    resumed = CachedEmbedder(EMBEDDER, tmp_path, "keywords")
    resumed.embed(more)
    assert resumed.misses == 1  # the two chunks written before the interruption are kept
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        CachedEmbedder(EMBEDDER, tmp_path, chunk_size=0)


def test_default_mode_is_soft_knn_and_reruns_read_cached_predictions(
    split_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    train, test = (load_dataset(d) for d in split_dirs)
    settings = Settings(classifier="logreg", folds=3)
    first = run_benchmark(
        train, test, [40.0], EMBEDDER, settings, progress=lambda _: None, cache_dir=tmp_path
    )
    assert first["mode"] == "soft-knn" and set(first["modes"]) == set(MODES)
    assert first["budgets"][0]["accuracy"] == first["modes"]["soft-knn"][0]["accuracy"]
    assert first["router_probabilities"] == "classifier+knn"
    assert first["router_accuracy"] == first["router_accuracy_by_probabilities"]["classifier+knn"]
    mixture = first["neighbour_mixture"]
    assert mixture["classifier_weight"] + mixture["embedding_vote_weight"] + mixture[
        "tfidf_vote_weight"
    ] == pytest.approx(1.0)
    assert not first["class_predictions_cached"]
    again = run_benchmark(
        train, test, [40.0], EMBEDDER, settings, progress=lambda _: None, cache_dir=tmp_path
    )
    assert again["class_predictions_cached"]
    assert again["modes"] == first["modes"]  # the cache changes nothing but the time


def test_unknown_mode_is_rejected(split_dirs: tuple[Path, Path]) -> None:
    train, test = (load_dataset(d) for d in split_dirs)
    with pytest.raises(ValueError, match="unknown mode 'fancy'"):
        run_benchmark(train, test, [40.0], EMBEDDER, Settings(mode="fancy"), lambda _: None)
