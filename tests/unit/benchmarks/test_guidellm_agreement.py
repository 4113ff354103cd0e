"""The guidellm / harness comparison's planning and parsing, without a server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import guidellm_agreement as agreement


def test_prompts_are_bounded_distinct_and_seeded(tmp_path: Path) -> None:
    data = tmp_path / "p.jsonl"
    rows = [{"prompt": f"question {i}"} for i in range(30)] + [{"prompt": "x" * 5000}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chosen = agreement.choose_prompts([data], 10, seed=0, max_chars=2000)
    assert len(set(chosen)) == 10 and all(len(p) <= 2000 for p in chosen)
    assert chosen == agreement.choose_prompts([data], 10, seed=0, max_chars=2000)


def test_harness_plan_keeps_prompt_order_in_both_modes() -> None:
    prompts = ["a", "b", "c"]
    open_plan = agreement.harness_plan(prompts, 0.5, seed=0, synchronous=False)
    assert [p.prompt for p in open_plan.requests] == prompts
    assert open_plan.mode == "open" and all(p.stream for p in open_plan.requests)
    closed = agreement.harness_plan(prompts, 0.5, seed=0, synchronous=True)
    assert closed.mode == "closed" and closed.users == 1
    assert [p.at_s for p in closed.requests] == [None, None, None]


def test_guidellm_command_mirrors_the_harness_settings(tmp_path: Path) -> None:
    args = argparse.Namespace(
        url="http://127.0.0.1:8000",
        max_tokens=32,
        rate=0.25,
        count=20,
        seed=0,
        synchronous=False,
    )
    command = agreement.guidellm_command(args, tmp_path / "d.jsonl", tmp_path, tmp_path / "r")
    joined = " ".join(command)
    assert "model=coe,max_tokens=32" in joined and "kind=poisson,rate=0.25" in joined
    assert "kind=max_requests,count=20" in joined
    args.synchronous = True
    assert "kind=synchronous" in agreement.guidellm_command(args, tmp_path, tmp_path, tmp_path)


def test_summary_and_report_parsing() -> None:
    report = {
        "benchmarks": [
            {
                "requests": {
                    "successful": [{"time_to_first_token_ms": 500.0, "request_latency": 2.0}],
                    "errored": [{"time_to_first_token_ms": None}],
                    "incomplete": None,
                }
            }
        ]
    }
    found = agreement.guidellm_requests(report)
    assert [r["status"] for r in found] == ["successful", "errored"]
    figures = agreement.summary([0.5, 1.5], [2.0, 4.0], [0.0, 4.0], requests=2, ok=2)
    assert figures["sent_rps"] == pytest.approx(0.25)
    assert figures["ttft_mean_s"] == pytest.approx(1.0)
    assert figures["latency_p50_s"] == pytest.approx(3.0)


def test_only_loopback_targets() -> None:
    with pytest.raises(SystemExit):
        agreement.parse_args(["--url", "http://10.0.0.1:8000", "--json", "x.json"])
