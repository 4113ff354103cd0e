"""A short soak of the demo cluster: mixed good, bad and cancelled requests, then a normal one.

The long run is `python -m benchmarks.soak`; this smoke version checks that the cluster
gives no unexpected status under the mix, refuses every bad request with its own 4xx,
survives clients that hang up mid-stream, and that memory stays within a bound.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from benchmarks import soak
from tests.conftest import DEMO_CONFIG
from tests.integration.conftest import RunningCluster

pytestmark = pytest.mark.integration

# Largest memory growth (replicas + Serve's actors + object store) a short soak may show.
MAX_GROWTH_FRACTION = 0.25
PROMPTS = [
    "What is the capital of France?",
    "Solve 3x + 4 = 19 for x.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
]


@pytest.mark.timeout(600)
def test_short_soak_gets_no_unexpected_status(cluster: RunningCluster, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "soak.json"
    code = soak.main(
        [
            "--url", cluster.base_url, "--config", str(DEMO_CONFIG), "--duration", "10",
            "--rate", "1.5", "--bad", "0.3", "--cancel", "0.3", "--max-tokens", "8",
            "--timeout", "120", "--sample-s", "5", "--prompts", str(prompts), "--no-progress",
            "--json", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["failures"] == 0, report["failure_examples"]
    assert code == 0
    by_kind = report["by_kind"]
    assert all(by_kind[kind] > 0 for kind in ("good", "bad", "cancel")), by_kind
    assert report["bad_refused_as_expected"] == by_kind["bad"], report["statuses"]
    assert report["results"]["good"]["ok"] > 0
    assert report["good_latency"]["p50_s"] is not None
    memory = report["memory"]
    for moment in ("start", "end"):
        assert memory[moment]["replica_bytes"] > 0
        # This process is the cluster's driver, so the object store is measured too.
        assert memory[moment]["object_store_bytes"] is not None
    # The cluster is warm (earlier tests ran on it): a short mixed run may page in a little
    # more, but not grow by a quarter; the ten-minute soak grew 12% from a cold start.
    assert memory["growth_fraction"] is not None
    assert memory["growth_fraction"] < MAX_GROWTH_FRACTION, memory
    # Clients that hung up mid-stream left the cluster able to answer.
    body = {"model": "coe", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 8}
    response = httpx.post(
        f"{cluster.base_url}/v1/chat/completions", json=body, timeout=120, trust_env=False
    )
    assert response.status_code == 200, response.text
