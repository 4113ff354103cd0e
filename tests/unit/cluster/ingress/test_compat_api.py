"""What OpenAI-compatible tools send, over a fake backend: vLLM's extra sampling fields,
refused fields with OpenAI's error shape, GET /health and POST /v1/completions."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cluster.config import ServeSettings
from cluster.ingress.auth import ApiKeyGate
from cluster.ingress.http_api import build_http_app
from cluster.ingress.request_fields import REFUSALS, is_neutral
from cluster.ingress.service import ChatStream, CoEService
from tests.unit.fakes import FakeBackend

LIMITS = ServeSettings(max_prompt_chars=200, max_tokens_limit=64, default_max_tokens=16)
CHAT = {"model": "coe", "messages": [{"role": "user", "content": "what is the sum of 2 and 2"}]}
TEXT = {"model": "coe", "prompt": "The sum of 2 and 2 is"}


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(["general", "math"])


@pytest.fixture
def client(backend: FakeBackend) -> TestClient:
    return TestClient(build_http_app(CoEService(LIMITS, backend)))


def events(raw: str) -> list[Any]:
    """The JSON payloads of an SSE body, `[DONE]` as the string."""
    payloads = [line[len("data: ") :] for line in raw.splitlines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


# --- routes -----------------------------------------------------------------------------


def test_health_answers_beside_healthz_without_a_key(backend: FakeBackend) -> None:
    locked = TestClient(build_http_app(CoEService(LIMITS, backend), ApiKeyGate("sk-key")))
    for path in ("/health", "/healthz"):
        response = locked.get(path)
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
    assert locked.post("/v1/completions", json=TEXT).status_code == 401


def test_text_completion_has_openai_shape_and_routes(
    client: TestClient, backend: FakeBackend
) -> None:
    response = client.post("/v1/completions", json=TEXT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == "math"
    choice = body["choices"][0]
    assert choice == {
        "index": 0,
        "text": "math says: The sum of 2 and 2 is",
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert body["coe"]["routed"] is True
    assert response.headers["x-coe-expert"] == "math"
    assert backend.calls == [("route", TEXT["prompt"]), ("generate", "math")]
    sent = backend.requests[-1]
    assert sent.prompt == TEXT["prompt"] and sent.messages == ()
    assert sent.max_tokens == LIMITS.default_max_tokens


def test_text_completion_takes_a_list_of_one_prompt_and_a_named_expert(
    client: TestClient, backend: FakeBackend
) -> None:
    body = {"model": "general", "prompt": ["Once upon a time"], "max_tokens": 5}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["coe"]["category"] == "direct"
    assert backend.requests[-1].prompt == "Once upon a time"
    assert backend.requests[-1].max_tokens == 5


def test_text_completion_streams_text_chunks_and_usage(client: TestClient) -> None:
    body = {**TEXT, "stream": True, "stream_options": {"include_usage": True}}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response.text)
    assert chunks[-1] == "[DONE]"
    texts = chunks[:-2]
    assert all(c["object"] == "text_completion" for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in texts) == "hello world"
    assert texts[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in texts)  # usage only at the end unless continuous
    assert chunks[-2]["choices"] == []
    assert chunks[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert len({c["id"] for c in chunks[:-1]}) == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_continuous_usage_puts_the_usage_so_far_on_every_chunk(
    client: TestClient, path: str
) -> None:
    base = CHAT if path.endswith("chat/completions") else TEXT
    options = {"include_usage": True, "continuous_usage_stats": True}
    response = client.post(path, json={**base, "stream": True, "stream_options": options})
    assert response.status_code == 200
    chunks = [c for c in events(response.text) if c != "[DONE]"]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"]["prompt_tokens"] == 3 for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 2
    assert chunks[-1]["choices"] == []


def test_continuous_usage_without_include_usage_adds_nothing(client: TestClient) -> None:
    options = {"continuous_usage_stats": True}
    response = client.post(
        "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": options}
    )
    assert response.status_code == 200
    assert all("usage" not in c for c in events(response.text) if c != "[DONE]")


def test_handle_callers_get_text_completions(backend: FakeBackend) -> None:
    service = CoEService(LIMITS, backend)

    async def scenario() -> str:
        body = await service.text_completion(TEXT)
        assert body["choices"][0]["text"].startswith("math says")
        stream = await service.open_text_stream({**TEXT, "stream": True})
        assert isinstance(stream, ChatStream)
        return "".join([c["choices"][0]["text"] async for c in stream if c["choices"]])

    assert asyncio.run(scenario()) == "hello world"


# --- honoured fields --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_vllm_sampling_fields_reach_the_engine(
    client: TestClient, backend: FakeBackend, path: str
) -> None:
    base = CHAT if path.endswith("chat/completions") else TEXT
    extras = {
        "temperature": 0.7,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.2,
        "min_tokens": 3,
        "ignore_eos": True,
        "max_tokens": 8,
        "skip_special_tokens": True,
        "spaces_between_special_tokens": False,
        "length_penalty": 0.5,
    }
    response = client.post(path, json={**base, **extras})
    assert response.status_code == 200, response.text
    sent = backend.requests[-1]
    assert (sent.temperature, sent.top_k, sent.min_p) == (0.7, 20, 0.05)
    assert (sent.repetition_penalty, sent.min_tokens, sent.ignore_eos) == (1.2, 3, True)
    assert sent.min_new_tokens == 8  # ignore_eos: end-of-sequence never before max_tokens


def test_off_values_of_top_k_and_min_p_mean_off(client: TestClient, backend: FakeBackend) -> None:
    for top_k in (-1, 0):
        body = {**CHAT, "temperature": 1.0, "top_k": top_k, "min_p": 0}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        sent = backend.requests[-1]
        assert (sent.top_k, sent.min_p, sent.repetition_penalty) == (None, None, 1.0)


NEUTRAL = {
    "n": 1,
    "best_of": 1,
    "logprobs": False,
    "top_logprobs": 0,
    "presence_penalty": 0,
    "frequency_penalty": 0.0,
    "logit_bias": {},
    "stop_token_ids": [],
    "bad_words": [],
    "use_beam_search": False,
    "include_stop_str_in_output": False,
    "priority": 0,
    "user": "someone",
    "seed": 3,
}


def test_refused_fields_sent_with_their_neutral_values_are_accepted(
    client: TestClient, backend: FakeBackend
) -> None:
    response = client.post("/v1/chat/completions", json={**CHAT, **NEUTRAL})
    assert response.status_code == 200, response.text
    text = {**TEXT, **NEUTRAL, "logprobs": None, "echo": False, "suffix": None}
    response = client.post("/v1/completions", json=text)
    assert response.status_code == 200, response.text


def refused_with_400(
    client: TestClient, backend: FakeBackend, path: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """The OpenAI error body of a request the API refuses before any backend call."""
    base = CHAT if path.endswith("chat/completions") else TEXT
    response = client.post(path, json={**base, **extra})
    assert response.status_code == 400, response.text
    assert backend.calls == []
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


REFUSED = [
    ("/v1/chat/completions", {"n": 2}, "n"),
    ("/v1/completions", {"n": 3}, "n"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 0}, "logprobs"),
    ("/v1/completions", {"logprobs": 2}, "logprobs"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {"frequency_penalty": -1}, "frequency_penalty"),
    ("/v1/chat/completions", {"logit_bias": {"42": 5}}, "logit_bias"),
    ("/v1/chat/completions", {"skip_special_tokens": False}, "skip_special_tokens"),
    ("/v1/completions", {"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ("/v1/chat/completions", {"stop_token_ids": [2]}, "stop_token_ids"),
    ("/v1/chat/completions", {"bad_words": ["no"]}, "bad_words"),
    ("/v1/chat/completions", {"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
    ("/v1/chat/completions", {"truncate_prompt_tokens": 10}, "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"priority": 1}, "priority"),
]


@pytest.mark.parametrize(("path", "extra", "param"), REFUSED, ids=[r[2] for r in REFUSED])
def test_refused_fields_get_openai_errors_and_change_nothing(
    client: TestClient, backend: FakeBackend, path: str, extra: dict[str, Any], param: str
) -> None:
    error = refused_with_400(client, backend, path, extra)
    assert error["code"] == "unsupported_value"
    assert error["param"] == param
    assert f"{param}=" in error["message"] and "not supported" in error["message"]


BAD = [
    ("/v1/chat/completions", {"top_k": -2}, "top_k"),
    ("/v1/chat/completions", {"top_k": "5"}, "top_k"),
    ("/v1/chat/completions", {"min_p": 1.5}, "min_p"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
    ("/v1/chat/completions", {"min_tokens": 17}, "min_tokens"),  # over the default 16
    ("/v1/chat/completions", {"ignore_eos": "yes"}, "ignore_eos"),
    ("/v1/chat/completions", {"n": 0}, "n"),
    ("/v1/chat/completions", {"stream_options": {"continuous_usage_stats": 1}}, "stream_options"),
    ("/v1/chat/completions", {"guided_json": {}}, "guided_json"),
    ("/v1/completions", {"messages": CHAT["messages"]}, "messages"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2]]}, "prompt"),
    ("/v1/completions", {"prompt": 7}, "prompt"),
    ("/v1/completions", {"prompt": "x" * 201}, "limit is 200"),
    ("/v1/completions", {"max_tokens": 65}, "limit of 64"),
    ("/v1/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
]


@pytest.mark.parametrize(("path", "extra", "fragment"), BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_bad_values_of_new_fields_are_400s(
    client: TestClient, backend: FakeBackend, path: str, extra: dict[str, Any], fragment: str
) -> None:
    assert fragment in refused_with_400(client, backend, path, extra)["message"]


def test_text_completion_without_prompt_or_with_unknown_model(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"model": "coe"})
    assert response.status_code == 400 and "prompt" in response.json()["error"]["message"]
    response = client.post("/v1/completions", json={**TEXT, "model": "gpt-9"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_every_refusal_names_a_neutral_value() -> None:
    for refusal in REFUSALS:
        assert refusal.neutral and refusal.reason
        assert is_neutral(refusal.neutral[0], refusal.neutral)
    assert not is_neutral(1, (None, True)) and not is_neutral(0, (None, False))
    assert is_neutral(0.0, (None, 0)) and not is_neutral(True, (None, 1))


def test_published_schema_lists_the_new_route_and_fields(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert {"/health", "/v1/completions"} <= set(document["paths"])
    body = document["paths"]["/v1/completions"]["post"]["requestBody"]
    fields = body["content"]["application/json"]["schema"]["properties"]
    assert {"top_k", "ignore_eos", "prompt", "stream_options"} <= set(fields)
    schemas = document["components"]["schemas"]
    assert "continuous_usage_stats" in schemas["StreamOptions"]["properties"]
