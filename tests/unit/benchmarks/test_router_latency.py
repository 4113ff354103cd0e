"""The router latency benchmark: argument errors and a smoke run with a fake embedder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import router_latency
from router.classify.classifier import CentroidClassifier
from router.training.vote_fit import fit_neighbour_vote_classifier
from tests.unit.fakes import KeywordEmbedder
from tests.unit.router.training.test_mmlu_pro import write_synthetic_dataset

EMBEDDER = KeywordEmbedder(["sum", "python", "poem"])
KEYS = {
    "route_p50_ms",
    "route_p99_ms",
    "route_batch_prompts_per_s",
    "embed_p50_ms",
    "embed_batch_prompts_per_s",
    "router_overhead_pct",
}


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def prompt_files(tmp_path: Path) -> list[Path]:
    short = write_jsonl(
        tmp_path / "short.jsonl", [{"prompt": f"sum {i} and python"} for i in range(12)]
    )
    long = write_jsonl(
        tmp_path / "long.jsonl", [{"question": "write a poem " * (20 + i)} for i in range(5)]
    )
    return [short, long]


@pytest.fixture(params=["centroid", "text-logreg+votes"])
def classifier_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    directory = tmp_path / request.param  # named by the kind the benchmark should report
    if request.param == "centroid":
        CentroidClassifier(0.1).fit(
            EMBEDDER.embed(["sum", "python", "poem"]), ["math", "code", "writing"]
        ).save(directory)
    else:  # any kind `coe router train` saves is read
        texts = ["sum it", "a sum", "python code", "code python", "a poem", "poem it"]
        labels = ["math", "math", "code", "code", "writing", "writing"]
        fit_neighbour_vote_classifier(texts, EMBEDDER.embed(texts), labels).save(directory)
    return directory


def run_main(argv: list[str], tmp_path: Path) -> int:
    # An empty MMLU-Pro directory: no score table, so the map is a synthetic one.
    return router_latency.main([*argv, "--mmlu-pro", str(tmp_path / "none")], embedder=EMBEDDER)


def test_smoke_run_writes_every_key(
    tmp_path: Path,
    prompt_files: list[Path],
    classifier_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out" / "latency.json"
    argv = ["--json", str(out), "--prompts", *map(str, prompt_files)]
    argv += ["--classifier", str(classifier_dir), "--single", "10", "--batch-prompts", "15"]
    argv += ["--batch-size", "4", "--repeats", "2"]
    assert run_main(argv, tmp_path) == 0
    results = json.loads(out.read_text())
    assert results.keys() >= KEYS | {"classify_map_p50_ms", "router_own_overhead_pct"}
    assert all(results[k] > 0 for k in KEYS - {"router_overhead_pct"})
    assert set(results["per_file"]) == {"short.jsonl", "long.jsonl"}
    assert results["per_file"]["short.jsonl"]["single_prompts"] == 5
    assert results["settings"]["batch_prompts"] == 15
    assert results["settings"]["classifier"] == classifier_dir.name
    assert "router overhead" in capsys.readouterr().out


def test_soft_mode_needs_scores_for_the_categories(
    tmp_path: Path, prompt_files: list[Path], classifier_dir: Path
) -> None:
    argv = ["--json", str(tmp_path / "o.json"), "--prompts", str(prompt_files[0])]
    argv += ["--classifier", str(classifier_dir), "--mode", "soft"]
    with pytest.raises(ValueError, match="soft mode needs MMLU-Pro scores"):
        run_main(argv, tmp_path)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"prompt": "ok"}, {"text": "no prompt field"}], r"bad\.jsonl:2: needs a non-empty"),
        ([{"prompt": ""}], r"bad\.jsonl:1: needs a non-empty"),
        (["just a string"], r"bad\.jsonl:1: expected a JSON object"),
        ([], r"holds no prompts"),
    ],
)
def test_bad_prompt_files_are_named(
    tmp_path: Path, records: list[object], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--json", str(tmp_path / "o.json"), "--prompts", str(bad)], tmp_path)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_invalid_json_line_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"prompt": "fine"}\n{not json\n')
    with pytest.raises(SystemExit):
        run_main(["--json", str(tmp_path / "o.json"), "--prompts", str(bad)], tmp_path)
    assert "broken.jsonl:2: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompts", "/nonexistent/prompts.jsonl"], "prompt file /nonexistent/prompts.jsonl"),
        (["--classifier", "/nonexistent/dir"], "classifier directory /nonexistent/dir"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--repeats", "-1"], "--repeats must be >= 1"),
        (["--budget-b", "-5"], "--budget-b must be >= 0"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--max-seq-length", "2"], "--max-seq-length must be >= 8"),
        (["--mode", "fuzzy"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_message(
    tmp_path: Path,
    prompt_files: list[Path],
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--json", str(tmp_path / "o.json")]
    if "--prompts" not in extra:
        argv += ["--prompts", str(prompt_files[0])]
    with pytest.raises(SystemExit) as exit_info:
        run_main([*argv, *extra], tmp_path)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_round_robin_takes_evenly_from_every_file() -> None:
    per_file = {
        "a": [f"a{i}" for i in range(10)],
        "b": ["b0", "b1"],
        "c": [f"c{i}" for i in range(5)],
    }
    chosen = router_latency.round_robin(per_file, 9, seed=0)
    names = [name for name, _ in chosen]
    assert names.count("b") == 2 and names.count("a") == 4 and names.count("c") == 3
    assert len({prompt for _, prompt in chosen}) == 9
    assert router_latency.round_robin(per_file, 9, seed=0) == chosen
    assert len(router_latency.round_robin(per_file, 100, seed=0)) == 17


def test_max_seq_length_needs_a_real_model(tmp_path: Path, prompt_files: list[Path]) -> None:
    argv = ["--json", str(tmp_path / "o.json"), "--prompts", str(prompt_files[0])]
    with pytest.raises(ValueError, match="sentence-transformers model"):
        run_main([*argv, "--max-seq-length", "64"], tmp_path)


@pytest.mark.parametrize(("kind", "mode"), [("text-logreg", "soft"), ("logreg", "hard")])
def test_default_classifier_is_trained_on_mmlu_pro(
    tmp_path: Path,
    prompt_files: list[Path],
    kind: str,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COE_CACHE_DIR", str(tmp_path / "cache"))  # the embedding cache
    dataset = tmp_path / "mmlu"
    write_synthetic_dataset(dataset, per_topic=12)
    out = tmp_path / "latency.json"
    argv = ["--json", str(out), "--prompts", str(prompt_files[0]), "--mmlu-pro", str(dataset)]
    argv += ["--classifier-kind", kind, "--mode", mode, "--train-per-category", "8"]
    argv += ["--single", "6", "--batch-prompts", "8", "--batch-size", "4", "--repeats", "1"]
    assert router_latency.main(argv, embedder=KeywordEmbedder(["sum", "tort", "cell"])) == 0
    results = json.loads(out.read_text())
    assert results["settings"]["classifier"] == kind
    assert results["settings"]["categories"] == 3
    assert results["settings"]["mode"] == mode
    assert results["settings"]["embedder_load_s"] is None  # the embedder was given
    assert results["classify_p50_ms"] > 0 and results["classify_map_p50_ms"] > 0


def test_unknown_embedder_is_named(
    tmp_path: Path, prompt_files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--json", str(tmp_path / "o.json"), "--prompts", str(prompt_files[0])]
    with pytest.raises(SystemExit) as exit_info:
        router_latency.main([*argv, "--embedder", "word2vec"])
    assert exit_info.value.code == 2
    assert "unknown --embedder 'word2vec'" in capsys.readouterr().err
