"""The OpenAI-compatible HTTP API on the real cluster: real router, real experts."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.integration.conftest import RunningCluster

FRANCE = {
    "model": "coe",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
}


def post(cluster: RunningCluster, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{cluster.base_url}{path}", json=body, timeout=120, **kwargs)


def test_capital_of_france_is_answered_with_routing_metadata(cluster: RunningCluster) -> None:
    response = post(cluster, "/v1/chat/completions", FRANCE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert "Paris" in body["choices"][0]["message"]["content"]
    meta = body["coe"]
    assert meta["routed"] is True
    assert meta["expert"] == cluster.config.generalist
    assert meta["category"] == "general"
    assert 0.0 < meta["confidence"] <= 1.0
    assert response.headers["x-coe-expert"] == meta["expert"]
    assert response.headers["x-coe-category"] == "general"
    assert body["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("prompt", "expert"),
    [
        ("Solve 3x + 4 = 19 for x.", "math-tutor"),
        ("Write a Python function that checks whether a number is prime.", "code-assistant"),
        ("Why do plants need sunlight to grow?", "science-explainer"),
        ("Write a short poem about the moon.", "storyteller"),
    ],
)
def test_router_sends_domains_to_their_experts(
    cluster: RunningCluster, prompt: str, expert: str
) -> None:
    body = {"model": "coe", "max_tokens": 12, "messages": [{"role": "user", "content": prompt}]}
    response = post(cluster, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["coe"]["expert"] == expert
    assert response.json()["model"] == expert
    assert response.json()["choices"][0]["message"]["content"].strip()


def test_named_expert_is_served_directly(cluster: RunningCluster) -> None:
    body = {**FRANCE, "model": "science-explainer", "max_tokens": 8}
    response = post(cluster, "/v1/chat/completions", body)
    assert response.status_code == 200
    assert response.json()["coe"] == {
        "requested_model": "science-explainer",
        "routed": False,
        "expert": "science-explainer",
        "category": "direct",
        "confidence": 1.0,
        "fallback": False,
    }


def test_route_endpoint_decides_without_generating(cluster: RunningCluster) -> None:
    response = post(cluster, "/v1/route", {"prompt": "What is the integral of 2x?"})
    assert response.status_code == 200
    decision = response.json()
    assert decision["expert"] == "math-tutor"
    assert decision["category"] == "math"
    assert set(decision["scores"]) == {c.name for c in cluster.config.categories}


def test_unsure_prompt_goes_to_generalist(cluster: RunningCluster) -> None:
    # "hello" is close to no category's examples: the top probability stays low.
    decision = post(cluster, "/v1/route", {"prompt": "hello"}).json()
    threshold = cluster.config.router.confidence_threshold
    assert decision["confidence"] < threshold
    assert decision["fallback"] is True
    assert decision["expert"] == cluster.config.generalist


def test_models_and_health(cluster: RunningCluster) -> None:
    ids = [m["id"] for m in httpx.get(f"{cluster.base_url}/v1/models").json()["data"]]
    assert ids[0] == "coe"
    assert sorted(ids[1:]) == sorted(e.name for e in cluster.config.experts)
    assert httpx.get(f"{cluster.base_url}/healthz").json() == {"status": "ok"}


def test_streaming_sse_chunks(cluster: RunningCluster) -> None:
    body = {**FRANCE, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST", f"{cluster.base_url}/v1/chat/completions", json=body, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-coe-expert"] == "generalist"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "Paris" in text
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert chunks[0]["coe"]["expert"] == "generalist"


BAD = [
    ("malformed json", b'{"model": "coe", "messages": [', 400),
    ("missing messages", json.dumps({"model": "coe"}).encode(), 400),
    ("empty messages", json.dumps({**FRANCE, "messages": []}).encode(), 400),
    ("wrong type", json.dumps({**FRANCE, "messages": {"role": "user"}}).encode(), 400),
    ("unknown model", json.dumps({**FRANCE, "model": "gpt-4o"}).encode(), 404),
    ("max_tokens too big", json.dumps({**FRANCE, "max_tokens": 100_000}).encode(), 400),
    ("max_tokens negative", json.dumps({**FRANCE, "max_tokens": -1}).encode(), 400),
    (
        "prompt over limit",
        json.dumps({**FRANCE, "messages": [{"role": "user", "content": "a" * 9000}]}).encode(),
        400,
    ),
    ("unknown field", json.dumps({**FRANCE, "logit_bias_x": {}}).encode(), 400),
]


@pytest.mark.parametrize(("label", "raw", "status"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_and_cluster_keeps_serving(
    cluster: RunningCluster, label: str, raw: bytes, status: int
) -> None:
    response = httpx.post(
        f"{cluster.base_url}/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    good = post(cluster, "/v1/chat/completions", {**FRANCE, "max_tokens": 4})
    assert good.status_code == 200
