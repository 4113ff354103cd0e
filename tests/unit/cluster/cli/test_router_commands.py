"""`coe router train|eval` and `coe map optimize|frontier`: results and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cluster.cli.main import main
from router.embed.artifact_embedder import save_embedder_name, trained_embedder
from tests.unit.cluster.test_config import demo_data

EXAMPLES = {
    "math": ["What is 17 times 23?", "Solve 2x + 5 = 13.", "Integrate x squared.", "Add 5 and 8."],
    "coding": [
        "Write a Python function.",
        "Fix this Java bug.",
        "Explain a SQL join.",
        "Sort a list in Rust.",
    ],
}


@pytest.fixture
def labelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": p, "category": c} for c, ps in EXAMPLES.items() for p in ps]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["centroid", "logreg", "text-logreg", "text-logreg+votes"])
def test_train_then_eval(
    kind: str, labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "router"
    assert (
        main(["router", "train", "--data", str(labelled), "--out", str(out), "--kind", kind]) == 0
    )
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "router",
                "eval",
                "--classifier",
                str(out),
                "--data",
                str(labelled),
                "--json",
                str(report),
            ]
        )
        == 0
    )
    result = json.loads(report.read_text())
    assert trained_embedder(out) == "all-MiniLM-L6-v2"  # recorded beside the classifier
    assert result["accuracy"] == 1.0  # its own well-separated training prompts
    assert sum(map(sum, result["confusion"])) == 8
    assert "accuracy 1.0000" in capsys.readouterr().out


def test_unknown_embedder_is_refused_before_anything_is_written(
    labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "router"
    command = ["router", "train", "--data", str(labelled), "--out", str(out)]
    assert main([*command, "--embedder", "word2vec"]) == 2
    assert "unknown embedder 'word2vec'" in capsys.readouterr().out
    assert not out.exists()


def test_a_classifier_is_refused_with_another_embedder(labelled: Path, tmp_path: Path) -> None:
    from cluster.config import ConfigError, parse_config
    from cluster.setup_steps import build_router
    from tests.unit.cluster.test_config import demo_data

    out = tmp_path / "router"
    assert main(["router", "train", "--data", str(labelled), "--out", str(out)]) == 0
    save_embedder_name(out, "all-MiniLM-L6-v2-static")
    data = demo_data()
    data["router"] = {"classifier": "trained", "artifact": str(out)}
    with pytest.raises(ConfigError, match="trained on embedder 'all-MiniLM-L6-v2-static'"):
        build_router(parse_config(data))


def test_bad_training_inputs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    no_category = tmp_path / "bad.jsonl"
    no_category.write_text(json.dumps({"prompt": "hello"}) + "\n", encoding="utf-8")
    assert main(["router", "train", "--data", str(no_category), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: needs a non-empty 'category'" in capsys.readouterr().out
    with pytest.raises(SystemExit) as missing:
        main(["router", "train", "--data", str(tmp_path / "absent.jsonl"), "--out", "x"])
    assert missing.value.code == 2
    assert not (tmp_path / "o").exists()  # nothing written for bad input


def test_eval_rejects_unknown_categories(
    labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "router"
    main(["router", "train", "--data", str(labelled), "--out", str(out), "--kind", "centroid"])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "A sonnet", "category": "poetry"}), encoding="utf-8")
    assert main(["router", "eval", "--classifier", str(out), "--data", str(other)]) == 2
    assert "['poetry']" in capsys.readouterr().out


def scored_config(tmp_path: Path) -> Path:
    data = demo_data()
    data["expert_scores"] = {
        c["name"]: {
            e["name"]: (0.9 if e["name"] == data["category_map"][c["name"]] else 0.5)
            for e in data["experts"]
        }
        for c in data["categories"]
    }
    data["experts"][4]["params_b"] = 10.0  # the storyteller is expensive
    path = tmp_path / "scored.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_optimize_writes_the_map_into_a_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = scored_config(tmp_path)
    out = tmp_path / "optimised.yaml"
    # 1B average: writing (1/5 of traffic) cannot afford the 10B storyteller.
    assert (
        main(["map", "optimize", "--config", str(config), "--budget-b", "1", "--out", str(out)])
        == 0
    )
    written = yaml.safe_load(out.read_text())
    assert written["category_map"]["writing"] != "storyteller"
    assert written["category_map"]["math"] == "math-tutor"
    assert main(["config", "check", str(out)]) == 0
    assert main(["map", "optimize", "--config", str(config), "--budget-b", "100"]) == 0
    assert "writing              -> storyteller" in capsys.readouterr().out


def test_map_commands_reject_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = scored_config(tmp_path)
    assert main(["map", "optimize", "--config", str(config), "--budget-b", "0.01"]) == 2
    assert "infeasible" in capsys.readouterr().out
    assert main(["map", "frontier", "--config", str(config), "--data", str(tmp_path)]) == 2
    assert "exactly one of --data" in capsys.readouterr().out
    assert main(["map", "frontier", "--data", str(tmp_path)]) == 2
    assert "questions.jsonl" in capsys.readouterr().out


def test_frontier_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, rows = tmp_path / "f.png", tmp_path / "f.json"
    config = scored_config(tmp_path)
    assert (
        main(["map", "frontier", "--config", str(config), "--png", str(png), "--json", str(rows)])
        == 0
    )
    frontier = json.loads(rows.read_text())
    costs = [r["avg_active_params_b"] for r in frontier]
    qualities = [r["expected_quality"] for r in frontier]
    assert costs == sorted(costs) and qualities == sorted(qualities)
    assert png.stat().st_size > 1000
