"""`coe bench load|compare|ramp|soak|scale`: arguments, errors, a load run against the HTTP API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import compare, load, ramp
from benchmarks.systems import Scenario, copy_checkpoint
from cluster.cli.main import main as coe_main
from cluster.config import ServeSettings
from cluster.ingress.http_api import build_http_app
from cluster.ingress.service import CoEService
from tests.unit.benchmarks.harness.test_driver import serve_in_thread
from tests.unit.fakes import FakeBackend


def write_prompts(path: Path, count: int = 5) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(count)))
    return path


def test_load_runs_against_the_cluster_http_api(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl")
    backend = FakeBackend(["general", "math"])
    limits = ServeSettings(max_prompt_chars=200, max_tokens_limit=64, default_max_tokens=16)
    out = tmp_path / "load.json"
    with serve_in_thread(build_http_app(CoEService(limits, backend))) as url:
        code = load.main(
            [
                "--url",
                url,
                "--users",
                "2",
                "--count",
                "12",
                "--slo-s",
                "5",
                "--zipf",
                "1.0",
                "--stream-fraction",
                "0.5",
                "--prompts",
                str(prompts),
                "--json",
                str(out),
                "--no-progress",
            ]
        )
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["requests"] == 12 and summary["ok"] == 12 and summary["errors"] == {}
    # Experts came from the cluster's /v1/models; the first is the most popular.
    assert set(summary["per_expert"]) <= {"general", "math"}
    assert summary["stream_requests"] > 0
    assert (tmp_path / "load_latency_cdf.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate", "0", "--duration", "5", "--slo-s", "1"], "--rate must be > 0"),
        (["--rate", "-2", "--duration", "5", "--slo-s", "1"], "--rate must be > 0"),
        (["--rate", "1", "--slo-s", "1"], "must stop by itself"),
        (["--users", "2", "--duration", "5", "--slo-s", "1"], "closed loop needs --count"),
        (["--rate", "1", "--duration", "5"], "--slo-s"),
        (["--rate", "1", "--duration", "5", "--slo-s", "0"], "--slo-s must be > 0"),
        (
            ["--rate", "1", "--duration", "5", "--slo-s", "1", "--url", "http://8.8.8.8"],
            "not a loopback",
        ),
    ],
)
def test_load_refuses_bad_arguments(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load.main([*argv, "--json", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_load_names_a_missing_prompt_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.jsonl"
    code = load.main(
        [
            "--rate",
            "1",
            "--duration",
            "2",
            "--slo-s",
            "1",
            "--experts",
            "a,b",
            "--prompts",
            str(missing),
            "--json",
            str(tmp_path / "x.json"),
        ]
    )
    assert code == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate", "0"], "--rate must be > 0"),
        (["--slo-s", "-1"], "--slo-s must be > 0"),
        (["--duration", "0"], "--duration must be > 0"),
        (["--systems", "coe,vllm"], "unknown ['vllm']"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    ],
)
def test_compare_refuses_bad_arguments(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        compare.parse_args([*argv, "--json", str(tmp_path / "c.json")])
    assert message in capsys.readouterr().err


def test_compare_stops_on_a_missing_prompt_file_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ray cannot start in unit tests (conftest); reaching it would fail differently.
    missing = tmp_path / "gone.jsonl"
    code = compare.main(["--prompts", str(missing), "--json", str(tmp_path / "c.json")])
    assert code == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_compare_ratios_divide_coe_by_the_baselines() -> None:
    systems = {
        "coe": {
            "p99_s": 2.0,
            "goodput_rps": 3.0,
            "p50_s": 1.0,
            "peak_memory_bytes": 30,
            "peak_host_memory_bytes": 90,
        },
        "multiplex": {"p99_s": 8.0, "goodput_rps": 1.0},
        "resident": {"p50_s": 0.8, "peak_memory_bytes": 100, "peak_host_memory_bytes": 60},
    }
    assert compare.ratios(systems) == {
        "coe_p99_over_multiplex": 0.25,
        "coe_goodput_over_multiplex": 3.0,
        "coe_p50_over_resident": 1.25,
        "coe_memory_over_resident": 0.3,
        "coe_host_memory_over_resident": 1.5,
    }
    assert compare.ratios({"coe": systems["coe"]})["coe_p99_over_multiplex"] is None


def test_ramp_phases_parse_and_bad_ones_are_named() -> None:
    assert ramp.parse_phases("10:0.5,20:3,5:0") == [(10.0, 0.5), (20.0, 3.0), (5.0, 0.0)]
    for bad in ("10", "x:1", "0:1", "10:-1"):
        with pytest.raises(ValueError, match=repr(bad)):
            ramp.parse_phases(bad)


def test_ramp_reports_the_most_replicas_per_phase() -> None:
    samples = [
        {"t": 1.0, "replicas": {"expert-e1": 1}},
        {"t": 12.0, "replicas": {"expert-e1": 3, "expert-e2": 1}},
        {"t": 18.0, "replicas": {"expert-e1": 2}},
        {"t": 25.0, "replicas": {"expert-e1": 1}},
    ]
    rows = ramp.replicas_per_phase(samples, [(10.0, 0.5), (10.0, 3.0), (10.0, 0.5)], 0.0)
    assert [r["max_replicas"] for r in rows] == [1, 3, 1]
    assert [r["end_replicas"] for r in rows] == [1, 2, 1]


def test_scenario_budget_holds_its_experts_and_never_one_more(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"x" * 64)
    (source / "config.json").write_text("{}")
    scenario = Scenario(experts=4, hbm_experts=2, checkpoint=source, copies_dir=tmp_path / "c")
    assert scenario.names == ["e1", "e2", "e3", "e4"]
    with pytest.raises(ValueError, match="hbm_experts must be in"):
        Scenario(experts=4, hbm_experts=5, checkpoint=source, copies_dir=tmp_path)
    with pytest.raises(ValueError, match="experts must be >= 2"):
        Scenario(experts=1, hbm_experts=1, checkpoint=source, copies_dir=tmp_path)


def test_scenario_active_slots_default_to_the_experts_the_arena_holds(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    save_file({"w": torch.zeros(4, 4)}, str(source / "model.safetensors"))  # sizes the budget
    options = {"experts": 4, "hbm_experts": 2, "checkpoint": source, "copies_dir": tmp_path}
    assert Scenario(**options).config(tiers=True).tiers.active_slots == 2
    assert Scenario(**options, active_slots=1).config(tiers=True).tiers.active_slots == 1
    with pytest.raises(ValueError, match="active_slots must be >= 1, got 0"):
        Scenario(**options, active_slots=0)


def test_checkpoint_copies_are_distinct_files_made_once(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"w" * 100)
    (source / "tokenizer.json").write_text("{}")
    copy_checkpoint(source, tmp_path / "e1", lambda _: None)
    copied = tmp_path / "e1" / "model.safetensors"
    assert copied.read_bytes() == b"w" * 100
    assert copied.stat().st_ino != (source / "model.safetensors").stat().st_ino
    before = copied.stat().st_mtime_ns
    copy_checkpoint(source, tmp_path / "e1", lambda _: None)
    assert copied.stat().st_mtime_ns == before


def test_coe_bench_forwards_to_the_benchmark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        coe_main(
            [
                "bench",
                "load",
                "--",
                "--rate",
                "0",
                "--duration",
                "1",
                "--slo-s",
                "1",
                "--json",
                str(tmp_path / "x.json"),
            ]
        )
    assert "--rate must be > 0" in capsys.readouterr().err


def test_coe_bench_soak_forwards_to_the_soak(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--rate", "1", "--duration", "0", "--json", str(tmp_path / "s.json")]
    with pytest.raises(SystemExit):
        coe_main(["bench", "soak", "--", *argv])
    assert "--duration must be > 0" in capsys.readouterr().err


def test_coe_bench_scale_forwards_to_the_scale_benchmark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--rate", "0", "--json", str(tmp_path / "s.json")]
    with pytest.raises(SystemExit):
        coe_main(["bench", "scale", "--", *argv])
    assert "--rate must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
