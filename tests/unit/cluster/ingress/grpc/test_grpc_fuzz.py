"""Hypothesis fuzz of the gRPC request messages against the ingress methods (fake backend).

Whatever a client puts in a message, no exception escapes a method, the status is
one of the mapped codes, a refused request touches no expert, and an accepted one
gets a complete reply.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cluster.ingress.grpc.methods import MAX_DETAILS_CHARS, coe_pb2
from tests.unit.cluster.ingress.grpc.test_grpc_ingress import FakeContext, Ingress
from tests.unit.fakes import FakeBackend

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)
# Mostly short text (with the odd control character and emoji), sometimes long.
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "what is the sum of 2 and 2", "hello"]),
    st.text(alphabet="xy \n", min_size=150, max_size=400),
)
ROLES = st.one_of(st.sampled_from(["user", "system", "assistant", "", "USER", "tool"]), TEXT)
MODELS = st.one_of(st.sampled_from(["coe", "", "general", "math", "Math", "coe "]), TEXT)
# The codes a request may end with: success, or what a client did wrong.
CLIENT_CODES = {None, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


@st.composite
def chat_messages(draw: st.DrawFn) -> coe_pb2.ChatMessage:
    message = coe_pb2.ChatMessage(role=draw(ROLES), content=draw(TEXT))
    if draw(st.booleans()):
        message.name = draw(TEXT)
    return message


VALID_MESSAGES = st.builds(
    lambda extra, text: [*extra, coe_pb2.ChatMessage(role="user", content=text)],
    st.lists(
        st.builds(
            coe_pb2.ChatMessage,
            role=st.sampled_from(["system", "assistant", "user"]),
            content=st.text(max_size=30),
        ),
        max_size=2,
    ),
    st.text(min_size=1, max_size=40).filter(str.strip),
)
# Each field: a value the server accepts, and anything at all.
FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "model": (st.sampled_from(["coe", "", "general", "math"]), MODELS),
    "messages": (VALID_MESSAGES, st.lists(chat_messages(), max_size=4)),
    "stop": (st.lists(st.text(min_size=1, max_size=5), max_size=4), st.lists(TEXT)),
    "max_tokens": (st.integers(1, 64), INT64),
    "temperature": (st.floats(0, 2), DOUBLES),
    "top_p": (st.floats(0.01, 1), DOUBLES),
    "seed": (INT64, INT64),
    "user": (TEXT, TEXT),
}
OPTIONAL = ("max_tokens", "temperature", "top_p", "seed", "user")


@st.composite
def generate_requests(draw: st.DrawFn) -> coe_pb2.GenerateRequest:
    """A valid request with up to two fields replaced by arbitrary values."""
    wild = set(draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=2)))
    values = {name: draw(FIELDS[name][name in wild]) for name in FIELDS}
    request = coe_pb2.GenerateRequest(
        model=values["model"], messages=values["messages"], stop=values["stop"]
    )
    for name in OPTIONAL:
        if name in wild or draw(st.booleans()):
            setattr(request, name, values[name])
    return request


@st.composite
def route_requests(draw: st.DrawFn) -> coe_pb2.RouteRequest:
    return coe_pb2.RouteRequest(
        prompt=draw(st.one_of(st.just(""), TEXT)),
        messages=draw(st.lists(chat_messages(), max_size=3)),
    )


def run_generate(request: coe_pb2.GenerateRequest) -> tuple[FakeBackend, FakeContext, Any]:
    backend = FakeBackend(["general", "math"])
    context = FakeContext()
    reply = asyncio.run(Ingress(backend).Generate(request, context))
    return backend, context, reply


def run_stream(request: coe_pb2.GenerateRequest) -> tuple[FakeBackend, FakeContext, list[Any]]:
    backend = FakeBackend(["general", "math"])
    context = FakeContext()

    async def collect() -> list[Any]:
        return [reply async for reply in Ingress(backend).GenerateStream(request, context)]

    return backend, context, asyncio.run(collect())


def check_refusal(backend: FakeBackend, context: FakeContext) -> None:
    assert context.code in CLIENT_CODES, (context.code, context.details)
    assert context.details and len(context.details) <= MAX_DETAILS_CHARS
    assert "Traceback" not in context.details
    assert [call for call in backend.calls if call[0] != "route"] == []


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(generate_requests())
def test_generate_never_raises(request: coe_pb2.GenerateRequest) -> None:
    backend, context, reply = run_generate(request)
    event(f"status {context.code}")
    if context.code is None:
        assert reply.routing.expert in ("general", "math")
        assert reply.finish_reason == "stop"
        assert reply.usage.total_tokens == 7
        assert dict(context.trailing)["x-coe-expert"] == reply.routing.expert
    else:
        check_refusal(backend, context)
        assert reply == coe_pb2.GenerateReply()


@FUZZ
@given(generate_requests())
def test_stream_never_raises(request: coe_pb2.GenerateRequest) -> None:
    backend, context, replies = run_stream(request)
    assert replies, "a stream always ends with a reply"
    if context.code is None:
        assert replies[0].HasField("routing")
        assert replies[-1].finish_reason == "length"
    else:
        check_refusal(backend, context)
        assert [reply.finish_reason for reply in replies] == ["error"]


@FUZZ
@given(route_requests())
def test_route_never_raises(request: coe_pb2.RouteRequest) -> None:
    backend = FakeBackend(["general", "math"])
    context = FakeContext()
    reply = asyncio.run(Ingress(backend).Route(request, context))
    if context.code is None:
        assert reply.expert in ("general", "math")
        assert [call[0] for call in backend.calls] == ["route"]
    else:
        assert context.code == grpc.StatusCode.INVALID_ARGUMENT
        assert backend.calls == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_that_parse_are_handled(raw: bytes) -> None:
    """Whatever the proxy manages to decode (unknown fields included) reaches a status."""
    try:
        request = coe_pb2.GenerateRequest.FromString(raw)
    except DecodeError:
        return  # the proxy's deserializer refuses these before any ingress code runs
    backend, context, _ = run_generate(request)
    if context.code is not None:
        check_refusal(backend, context)
