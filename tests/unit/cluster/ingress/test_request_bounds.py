"""Bounds a character count misses, over a fake backend: the number of messages, the size
of a body that arrives decoded (gRPC, handle calls), and an expert's refusal of a prompt
and budget past its context window."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from actors.engines.base import ContextLengthExceeded
from cluster.config import ServeSettings
from cluster.ingress.api_errors import InvalidRequest, PromptTooLong, RequestTooLarge
from cluster.ingress.auth import ApiKeyGate
from cluster.ingress.grpc.methods import GrpcIngressMixin, coe_pb2
from cluster.ingress.http_api import build_http_app
from cluster.ingress.service import CoEService, max_body_bytes
from tests.unit.fakes import FakeBackend

LIMITS = ServeSettings(
    max_prompt_chars=200, max_tokens_limit=64, default_max_tokens=16, max_messages=4
)
EXPERTS = ["general", "math"]
GOOD = {"model": "coe", "messages": [{"role": "user", "content": "what is the sum of 2 and 2"}]}


def turns(count: int) -> list[dict[str, Any]]:
    """`count` messages, all empty but the last: a character bound sees almost nothing."""
    empty = [{"role": "assistant", "content": ""} for _ in range(count - 1)]
    return [*empty, {"role": "user", "content": "hi"}]


def client_for(backend: FakeBackend, limits: ServeSettings = LIMITS) -> TestClient:
    return TestClient(build_http_app(CoEService(limits, backend)))


# --- the number of messages ---------------------------------------------------------------


def test_max_messages_is_a_documented_setting_of_at_least_one() -> None:
    assert ServeSettings().max_messages == 256
    assert ServeSettings.model_fields["max_messages"].description
    with pytest.raises(ValidationError):
        ServeSettings(max_messages=0)


def test_messages_at_the_limit_are_served_one_more_is_refused_by_name() -> None:
    backend = FakeBackend(EXPERTS)
    client = client_for(backend)
    assert (
        client.post("/v1/chat/completions", json={**GOOD, "messages": turns(4)}).status_code == 200
    )
    backend.calls.clear()
    refused = client.post("/v1/chat/completions", json={**GOOD, "messages": turns(5)})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["message"] == "the conversation has 5 messages; the limit is 4"
    assert (error["type"], error["param"]) == ("invalid_request_error", "messages")
    assert backend.calls == []  # neither routed nor sent to an expert


def test_the_default_refuses_thousands_of_empty_messages() -> None:
    backend = FakeBackend(EXPERTS)
    client = client_for(backend, ServeSettings())
    refused = client.post("/v1/chat/completions", json={**GOOD, "messages": turns(4601)})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == (
        "the conversation has 4601 messages; the limit is 256"
    )
    assert backend.calls == []


def test_route_messages_are_bounded_too() -> None:
    backend = FakeBackend(EXPERTS)
    client = client_for(backend)
    assert client.post("/v1/route", json={"messages": turns(4)}).status_code == 200
    backend.calls.clear()
    refused = client.post("/v1/route", json={"messages": turns(5)})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages"
    assert "the limit is 4" in refused.json()["error"]["message"]
    assert backend.calls == []


# --- a decoded body (gRPC, handle calls) is bounded like raw bytes -----------------------


class FakeContext:
    """What a gRPC method sets on Serve's context."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return []

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing_metadata: list[tuple[str, str]]) -> None:
        pass


class Ingress(GrpcIngressMixin):
    def __init__(self, backend: FakeBackend, limits: ServeSettings) -> None:
        self.service = CoEService(limits, backend)
        self.gate = ApiKeyGate(None)


def test_a_handle_body_larger_than_any_valid_request_is_refused_before_validation() -> None:
    backend = FakeBackend(EXPERTS)
    service = CoEService(LIMITS, backend)
    limit = max_body_bytes(LIMITS)
    huge = {**GOOD, "messages": turns(limit // 20)}  # each turn is 40 bytes of JSON
    for call in (service.chat(huge), service.route({"messages": huge["messages"]})):
        with pytest.raises(RequestTooLarge) as refused:
            asyncio.run(call)
        assert refused.value.status_code == 400
        assert refused.value.code == "request_too_large"
        assert f"exceeds the limit of {limit} bytes" in refused.value.message
    assert backend.calls == []


def test_a_handle_body_within_the_limits_is_never_too_large() -> None:
    # The worst case: every character an astral code point, 12 bytes escaped.
    smiles = {"role": "user", "content": "\U0001f600" * 200}
    within = {**GOOD, "messages": [*turns(3)[:-1], smiles]}
    assert len(json.dumps(within).encode()) <= max_body_bytes(LIMITS)
    assert asyncio.run(CoEService(LIMITS, FakeBackend(EXPERTS)).chat(within))["choices"]


def test_a_handle_body_that_is_not_json_is_a_400() -> None:
    service = CoEService(LIMITS, FakeBackend(EXPERTS))
    looped: dict[str, Any] = dict(GOOD)
    looped["self"] = looped
    with pytest.raises(InvalidRequest, match="not JSON"):
        asyncio.run(service.chat(looped))
    nested: Any = GOOD
    for _ in range(5000):
        nested = {"x": nested}
    with pytest.raises(InvalidRequest, match="nests too deeply"):
        asyncio.run(service.chat(nested))


def test_grpc_requests_get_the_same_bounds() -> None:
    backend = FakeBackend(EXPERTS)
    ingress = Ingress(backend, LIMITS)

    def generate(count: int) -> FakeContext:
        messages = [coe_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in turns(count)]
        context = FakeContext()
        asyncio.run(ingress.Generate(coe_pb2.GenerateRequest(messages=messages), context))
        return context

    assert generate(4).code is None
    too_many = generate(5)
    assert too_many.code == grpc.StatusCode.INVALID_ARGUMENT
    assert too_many.details == "the conversation has 5 messages; the limit is 4"
    too_large = generate(max_body_bytes(LIMITS) // 20)
    assert too_large.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the limit of" in too_large.details
    assert [call for call in backend.calls if call[0] != "route"] == [("generate", "general")]


# --- an expert's refusal: prompt tokens + max_tokens past its context window --------------

REFUSAL = ContextLengthExceeded(2048, 2000, 64)
MESSAGE = (
    "This model's maximum context length is 2048 tokens. However, you requested 2064 "
    "tokens (2000 in the messages, 64 in the completion). Please reduce the length of the "
    "messages or completion."
)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_context_length_exceeded_is_a_400_like_openais(stream: bool) -> None:
    client = client_for(FakeBackend(EXPERTS, refuse=REFUSAL))
    response = client.post("/v1/chat/completions", json={**GOOD, "stream": stream})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error == {
        "message": MESSAGE,
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }


def test_context_length_exceeded_reaches_handle_and_grpc_callers_typed() -> None:
    backend = FakeBackend(EXPERTS, refuse=ContextLengthExceeded(2048, 2000, 64, "prompt"))
    with pytest.raises(PromptTooLong) as refused:
        asyncio.run(CoEService(LIMITS, backend).text_completion({"model": "math", "prompt": "x"}))
    assert refused.value.code == "context_length_exceeded"
    assert refused.value.param == "prompt"
    assert "(2000 in the prompt, 64 in the completion)" in refused.value.message
    context = FakeContext()
    request = coe_pb2.GenerateRequest(messages=[coe_pb2.ChatMessage(role="user", content="x")])
    asyncio.run(Ingress(FakeBackend(EXPERTS, refuse=REFUSAL), LIMITS).Generate(request, context))
    assert (context.code, context.details) == (grpc.StatusCode.INVALID_ARGUMENT, MESSAGE)
