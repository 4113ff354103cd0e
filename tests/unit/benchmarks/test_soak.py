"""The soak benchmark: its planned mix, the bad requests' bytes, classification, the report,
and short runs against the real HTTP API over a fake backend (no Ray)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from benchmarks import soak
from benchmarks.harness.client import ErrorKind, Outcome
from benchmarks.harness.workload import WorkloadError
from benchmarks.soak_plan import (
    BAD_STATUS,
    Limits,
    MemorySample,
    Mix,
    SoakOutcome,
    SoakRequest,
    classify_bad,
    classify_cancel,
    classify_good,
    plan_soak,
    request_payload,
    summarise,
)
from cluster.config import load_config
from cluster.ingress.http_api import build_http_app
from cluster.ingress.service import CoEService
from tests.conftest import DEMO_CONFIG
from tests.unit.benchmarks.harness.test_driver import serve_in_thread
from tests.unit.fakes import FakeBackend

EXPERTS = ["general", "math", "code"]
PROMPTS = ["What is two plus two?", "Name a colour.", "Write a haiku."]
LIMITS = Limits(max_prompt_chars=100, max_tokens_limit=8)


def request(kind: str, variant: str, model: str = "coe", index: int = 0) -> SoakRequest:
    stream = variant.endswith("-stream")
    return SoakRequest(index, 0.0, kind, variant, model, "Hi there", stream)  # type: ignore[arg-type]


def test_plan_is_seeded_and_follows_the_mix() -> None:
    mix = Mix(bad=0.3, cancel=0.2, stream=0.5, routed=0.4)
    plan = plan_soak(PROMPTS, EXPERTS, rate=50.0, duration_s=20.0, mix=mix, seed=5)
    assert plan == plan_soak(PROMPTS, EXPERTS, rate=50.0, duration_s=20.0, mix=mix, seed=5)
    assert plan != plan_soak(PROMPTS, EXPERTS, rate=50.0, duration_s=20.0, mix=mix, seed=6)
    count = len(plan)
    assert 800 < count < 1200
    kinds = Counter(r.kind for r in plan)
    assert abs(kinds["bad"] / count - 0.3) < 0.05
    assert abs(kinds["cancel"] / count - 0.2) < 0.05
    assert [r.at_s for r in plan] == sorted(r.at_s for r in plan)
    assert all(0 <= r.at_s < 20.0 for r in plan)
    assert {r.variant for r in plan if r.kind == "bad"} == set(BAD_STATUS)
    assert all(r.stream for r in plan if r.kind == "cancel")
    good = [r for r in plan if r.kind == "good"]
    assert {r.variant for r in good} == {"routed", "routed-stream", "named", "named-stream"}
    for r in good:
        assert (r.model == "coe") == r.variant.startswith("routed")
        assert r.model == "coe" or r.model in EXPERTS
    unknown = [r for r in plan if r.variant == "unknown-model"]
    assert unknown and all(r.model not in EXPERTS and r.model != "coe" for r in unknown)


@pytest.mark.parametrize(
    ("shares", "message"),
    [
        ({"bad": 0.7, "cancel": 0.4}, "exceed 1"),
        ({"stream": 1.5}, "stream share must be in [0, 1], got 1.5"),
        ({"routed": -0.1}, "routed share"),
    ],
)
def test_mix_names_a_bad_share(shares: dict[str, float], message: str) -> None:
    with pytest.raises(WorkloadError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Mix(**shares)


def test_bad_requests_step_just_past_the_limits() -> None:
    long = json.loads(request_payload(request("bad", "prompt-too-long"), 4, LIMITS))
    assert len(long["messages"][0]["content"]) == LIMITS.max_prompt_chars + 1
    over = json.loads(request_payload(request("bad", "max-tokens-over-limit"), 4, LIMITS))
    assert over["max_tokens"] == LIMITS.max_tokens_limit + 1
    unknown = json.loads(request_payload(request("bad", "unknown-model", "nope"), 4, LIMITS))
    assert unknown["model"] == "nope"
    for index in range(3):
        raw = request_payload(request("bad", "invalid-json", index=index), 4, LIMITS)
        with pytest.raises(ValueError):
            json.loads(raw)
    for index in range(4):
        wrong = json.loads(request_payload(request("bad", "wrong-types", index=index), 4, LIMITS))
        assert not (
            isinstance(wrong, dict)
            and isinstance(wrong.get("model"), str)
            and isinstance(wrong.get("messages"), list)
            and isinstance(wrong.get("max_tokens", 1), int)
            and isinstance(wrong.get("stream", False), bool)
        )
    cancel = json.loads(request_payload(request("cancel", "named-stream", "math"), 4, LIMITS))
    assert cancel["stream"] is True and cancel["model"] == "math" and cancel["max_tokens"] == 4
    capped = json.loads(request_payload(request("cancel", "routed-stream"), 500, LIMITS))
    assert capped["max_tokens"] == LIMITS.max_tokens_limit


def outcome(ok: bool, kind: ErrorKind | None = None, served_by: str | None = "math") -> Outcome:
    return Outcome(
        index=0,
        expert="math",
        stream=False,
        ok=ok,
        status=200 if ok else None,
        error_kind=kind,
        started_s=0.0,
        ttft_s=None,
        total_s=0.1,
        tokens=1,
        served_by=served_by,
    )


@pytest.mark.parametrize(
    ("model", "answer", "expected"),
    [
        ("math", outcome(True), "ok"),
        ("math", outcome(True, served_by="code"), "wrong_expert"),
        ("coe", outcome(True, served_by="code"), "ok"),
        ("math", outcome(False, "http_429"), "overloaded"),
        ("math", outcome(False, "http_4xx"), "unexpected_status"),
        ("math", outcome(False, "http_5xx"), "unexpected_status"),
        ("math", outcome(False, "timeout"), "transport"),
        ("math", outcome(False, "stream_error"), "transport"),
    ],
)
def test_good_requests_are_classified(model: str, answer: Outcome, expected: str) -> None:
    assert classify_good(request("good", "named", model), answer) == expected


@pytest.mark.parametrize(
    ("variant", "status", "error_body", "expected"),
    [
        ("unknown-model", 404, True, "ok"),
        ("unknown-model", 400, True, "unexpected_status"),
        ("invalid-json", 400, True, "ok"),
        ("invalid-json", 400, False, "unexpected_status"),
        ("wrong-types", 200, False, "unexpected_status"),
        ("prompt-too-long", 500, True, "unexpected_status"),
        ("max-tokens-over-limit", 429, True, "overloaded"),
    ],
)
def test_bad_requests_are_classified(
    variant: str, status: int, error_body: bool, expected: str
) -> None:
    assert classify_bad(variant, status, error_body) == expected


def test_cancels_are_classified() -> None:
    assert classify_cancel(200, saw_chunk=True, transport_error=False) == "ok"
    assert classify_cancel(200, saw_chunk=False, transport_error=True) == "transport"
    assert classify_cancel(None, saw_chunk=False, transport_error=True) == "transport"
    assert classify_cancel(503, saw_chunk=False, transport_error=True) == "unexpected_status"
    assert classify_cancel(429, saw_chunk=False, transport_error=True) == "overloaded"


def test_summary_counts_kinds_results_latency_and_memory_growth() -> None:
    outcomes = [
        SoakOutcome(0, "good", "named", "ok", 200, 1.0),
        SoakOutcome(1, "good", "routed-stream", "ok", 200, 3.0, ttft_s=0.5),
        SoakOutcome(2, "good", "named", "unexpected_status", 503, 0.2, error="boom"),
        SoakOutcome(3, "bad", "unknown-model", "ok", 404, 0.1),
        SoakOutcome(4, "bad", "wrong-types", "overloaded", 429, 0.1),
        SoakOutcome(5, "cancel", "routed-stream", "ok", 200, 0.4, ttft_s=0.4),
        SoakOutcome(6, "cancel", "named-stream", "not_sent", None, 0.0),
    ]
    samples = [
        MemorySample(0.0, replica_bytes=1000, serve_system_bytes=100, object_store_bytes=500),
        MemorySample(5.0, replica_bytes=1300, serve_system_bytes=100, object_store_bytes=520),
    ]
    report = summarise(outcomes, wall_s=10.0, samples=samples)
    assert report["requests"] == 7
    assert report["by_kind"] == {"good": 3, "bad": 2, "cancel": 2}
    assert report["results"]["good"]["unexpected_status"] == 1
    assert report["results"]["cancel"]["not_sent"] == 1
    assert report["statuses"]["bad"] == {"404": 1, "429": 1}
    assert report["failures"] == 1 and report["failure_examples"][0]["error"] == "boom"
    assert report["bad_refused_as_expected"] == 1
    assert report["overloaded"] == 1
    # Latency is over the good requests answered in full: 1.0 s and 3.0 s.
    assert report["good_latency"]["p50_s"] == pytest.approx(2.0)
    assert report["good_latency"]["ttft_p50_s"] == pytest.approx(0.5)
    memory = report["memory"]
    assert memory["start"]["total_bytes"] == 1600 and memory["end"]["total_bytes"] == 1920
    assert memory["growth_bytes"] == 320 and memory["replica_growth_bytes"] == 300
    assert memory["growth_fraction"] == pytest.approx(0.2)
    json.dumps(report)  # JSON-ready


def prompts_file(tmp_path: Path) -> Path:
    # The last prompt is over the demo config's limit: good requests must not use it.
    path = tmp_path / "prompts.jsonl"
    prompts = [*PROMPTS, "x" * 9000]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def run_soak(tmp_path: Path, backend: FakeBackend, *extra: str) -> tuple[int, dict[str, Any]]:
    # The service gets the demo config's limits, which the soak reads from --config.
    limits = load_config(DEMO_CONFIG).serve
    out = tmp_path / "soak.json"
    with serve_in_thread(build_http_app(CoEService(limits, backend))) as url:
        code = soak.main(
            [
                "--url", url, "--duration", "3", "--rate", "15", "--bad", "0.3",
                "--cancel", "0.2", "--sample-s", "1", "--prompts", str(prompts_file(tmp_path)),
                "--config", str(DEMO_CONFIG), "--no-progress", "--json", str(out), *extra,
            ]
        )  # fmt: skip
    return code, json.loads(out.read_text())


def test_soak_against_the_http_api_refuses_every_bad_request(tmp_path: Path) -> None:
    code, report = run_soak(tmp_path, FakeBackend(EXPERTS))
    assert code == 0, report["failure_examples"]
    assert report["failures"] == 0
    assert all(report["by_kind"][kind] > 0 for kind in ("good", "bad", "cancel"))
    assert report["bad_refused_as_expected"] == report["by_kind"]["bad"]
    assert set(report["statuses"]["bad"]) <= {"400", "404"}
    assert report["results"]["cancel"]["ok"] == report["by_kind"]["cancel"]
    assert report["good_latency"]["p50_s"] is not None
    memory = report["memory"]
    assert memory["start"]["replica_bytes"] >= 0 and memory["end"] is not None
    assert memory["start"]["object_store_bytes"] is None  # no Ray here
    assert len(memory["samples"]) >= 2
    assert report["settings"]["planned"] == report["requests"]


def test_soak_reports_streams_that_fail(tmp_path: Path) -> None:
    # Every good stream ends in an error event; cancels close before it and are fine.
    code, report = run_soak(tmp_path, FakeBackend(EXPERTS, fail_stream=True), "--stream", "1")
    assert code == 1
    good = report["results"]["good"]
    assert good["transport"] == report["by_kind"]["good"] > 0
    assert report["failures"] == good["transport"]
    assert "failed" in report["failure_examples"][0]["error"]
    assert report["results"]["cancel"]["ok"] == report["by_kind"]["cancel"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate", "0", "--duration", "5"], "--rate must be > 0"),
        (["--rate", "1", "--duration", "-1"], "--duration must be > 0"),
        (["--rate", "1", "--duration", "5", "--bad", "0.8", "--cancel", "0.5"], "exceed 1"),
        (["--rate", "1", "--duration", "5", "--url", "http://10.0.0.1:8000"], "not a loopback"),
        (["--rate", "1", "--duration", "5", "--max-tokens", "0"], "--max-tokens"),
    ],
)
def test_soak_refuses_bad_arguments(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        soak.main([*argv, "--json", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_soak_refuses_max_tokens_over_the_servers_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--url", "http://127.0.0.1:9", "--rate", "1", "--duration", "1", "--max-tokens", "513"]
    code = soak.main(
        [*argv, "--prompts", str(prompts_file(tmp_path)), "--json", str(tmp_path / "x")]
    )
    assert code == 2
    assert "exceeds the server's 512" in capsys.readouterr().err


def test_soak_names_a_missing_prompt_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "gone.jsonl"
    argv = ["--url", "http://127.0.0.1:9", "--rate", "1", "--duration", "1"]
    code = soak.main([*argv, "--prompts", str(missing), "--json", str(tmp_path / "x.json")])
    assert code == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
