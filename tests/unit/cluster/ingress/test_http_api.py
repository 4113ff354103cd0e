"""The HTTP API over a fake backend: every bad input gets its 4xx and changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cluster.config import ServeSettings
from cluster.ingress.http_api import build_http_app
from cluster.ingress.service import CoEService
from tests.unit.fakes import FakeBackend

LIMITS = ServeSettings(max_prompt_chars=200, max_tokens_limit=64, default_max_tokens=16)
GOOD = {"model": "coe", "messages": [{"role": "user", "content": "what is the sum of 2 and 2"}]}


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(["general", "math"])


@pytest.fixture
def client(backend: FakeBackend) -> TestClient:
    return TestClient(build_http_app(CoEService(LIMITS, backend)))


def with_(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


def test_routed_completion_carries_metadata(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=GOOD)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].startswith("math says")
    assert body["coe"] == {
        "requested_model": "coe",
        "routed": True,
        "expert": "math",
        "category": "math",
        "confidence": 0.9,
        "fallback": False,
    }
    assert response.headers["x-coe-expert"] == "math"
    assert response.headers["x-coe-category"] == "math"
    assert float(response.headers["x-coe-confidence"]) == pytest.approx(0.9)
    assert body["usage"]["total_tokens"] == 7


def test_named_expert_skips_router(client: TestClient, backend: FakeBackend) -> None:
    response = client.post("/v1/chat/completions", json=with_(model="general"))
    assert response.status_code == 200
    assert response.json()["coe"]["routed"] is False
    assert response.json()["coe"]["category"] == "direct"
    assert [c[0] for c in backend.calls] == ["generate"]


BAD_INPUTS = [
    ("malformed json", b"{not json", 400, "not valid JSON"),
    ("not an object", json.dumps([1, 2]).encode(), 400, "JSON object"),
    ("missing messages", json.dumps({"model": "coe"}).encode(), 400, "messages"),
    ("empty messages", json.dumps(with_(messages=[])).encode(), 400, "messages"),
    ("messages wrong type", json.dumps(with_(messages="hi")).encode(), 400, "messages"),
    ("max_tokens wrong type", json.dumps(with_(max_tokens="5")).encode(), 400, "max_tokens"),
    ("unknown model", json.dumps(with_(model="gpt-9")).encode(), 404, "gpt-9"),
    ("max_tokens zero", json.dumps(with_(max_tokens=0)).encode(), 400, "max_tokens"),
    ("seed past 64 bits", json.dumps(with_(seed=2**64)).encode(), 400, "seed"),
    ("max_tokens over limit", json.dumps(with_(max_tokens=65)).encode(), 400, "limit of 64"),
    (
        "prompt too long",
        json.dumps(with_(messages=[{"role": "user", "content": "x" * 201}])).encode(),
        400,
        "limit is 200",
    ),
    ("unknown field", json.dumps(with_(frobnicate=True)).encode(), 400, "frobnicate"),
    (
        "unknown message field",
        json.dumps(with_(messages=[{"role": "user", "content": "hi", "mood": 1}])).encode(),
        400,
        "mood",
    ),
    (
        "bad role",
        json.dumps(with_(messages=[{"role": "wizard", "content": "hi"}])).encode(),
        400,
        "role",
    ),
    (
        "no user message",
        json.dumps(with_(messages=[{"role": "system", "content": "hi"}])).encode(),
        400,
        "user message",
    ),
    ("temperature out of range", json.dumps(with_(temperature=3)).encode(), 400, "temperature"),
    ("n above one", json.dumps(with_(n=2)).encode(), 400, "n"),
    ("too many stops", json.dumps(with_(stop=["a", "b", "c", "d", "e"])).encode(), 400, "stop"),
]


@pytest.mark.parametrize(
    ("label", "raw", "status", "fragment"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_is_rejected_without_side_effects(
    client: TestClient, backend: FakeBackend, label: str, raw: bytes, status: int, fragment: str
) -> None:
    response = client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    assert backend.calls == []  # nothing routed, nothing generated
    assert client.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_streaming_is_openai_sse(client: TestClient) -> None:
    request = with_(stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-coe-expert"] == "math"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "hello world"
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_stream_failure_after_headers_becomes_error_event() -> None:
    client = TestClient(
        build_http_app(CoEService(LIMITS, FakeBackend(["general", "math"], fail_stream=True)))
    )
    with client.stream("POST", "/v1/chat/completions", json=with_(stream=True)) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "expert_unavailable"


def test_models_lists_coe_and_experts(client: TestClient) -> None:
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["coe", "general", "math"]


def test_route_endpoint(client: TestClient, backend: FakeBackend) -> None:
    body = client.post("/v1/route", json={"prompt": "the sum please"}).json()
    assert body["expert"] == "math"
    messages = {"messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/route", json=messages).json()["expert"] == "general"
    assert [c[0] for c in backend.calls] == ["route", "route"]
    both = client.post("/v1/route", json={"prompt": "a", **messages})
    assert both.status_code == 400
    assert client.post("/v1/route", json={}).status_code == 400


def test_healthz_and_unknown_path(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404
    assert "error" in missing.json()


def test_openapi_schema_documents_request_bodies(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert "messages" in body["content"]["application/json"]["schema"]["properties"]


def test_published_schema_has_no_dangling_references(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    schemas = document["components"]["schemas"]
    assert {"MessageIn", "StreamOptions"} <= set(schemas)
    assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs)
