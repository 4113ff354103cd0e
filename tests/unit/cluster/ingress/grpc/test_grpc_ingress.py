"""The gRPC ingress methods over a fake backend, the status mapping, codegen and the bind hook."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from actors.engines.base import GenerationRequest, GenerationResult
from cluster.config import ServeSettings
from cluster.ingress.api_errors import (
    CoEError,
    ExpertFailed,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PromptTooLong,
    RequestTimedOut,
    RouterUnavailable,
    Unauthorized,
)
from cluster.ingress.auth import ApiKeyGate
from cluster.ingress.grpc import codegen as grpc_codegen
from cluster.ingress.grpc.methods import (
    INTERNAL_DETAILS,
    MAX_DETAILS_CHARS,
    GrpcIngressMixin,
    chat_body,
    coe_pb2,
    metadata_value,
    status_code_for,
)
from cluster.ingress.service import CoEService
from cluster.serve import grpc_proxy, ray_internals
from router.decision import RouteDecision
from tests.unit.fakes import FakeBackend

LIMITS = ServeSettings(max_prompt_chars=200, max_tokens_limit=64, default_max_tokens=16)
KEY = "s3cret-key"


class FakeContext:
    """Records what a method sets, like Serve's `RayServegRPCContext`."""

    def __init__(self, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.metadata = list(metadata)
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: list[tuple[str, str]] = []

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing_metadata: list[tuple[str, str]]) -> None:
        self.trailing = list(trailing_metadata)


class Ingress(GrpcIngressMixin):
    def __init__(self, backend: FakeBackend, key: str | None = None) -> None:
        self.service = CoEService(LIMITS, backend)
        self.gate = ApiKeyGate(key)


def ask(prompt: str = "what is the sum of 2 and 2", **fields: Any) -> coe_pb2.GenerateRequest:
    messages = [coe_pb2.ChatMessage(role="user", content=prompt)]
    return coe_pb2.GenerateRequest(messages=messages, **fields)


def generate(ingress: Ingress, request: Any, context: FakeContext) -> coe_pb2.GenerateReply:
    return asyncio.run(ingress.Generate(request, context))


def stream(ingress: Ingress, request: Any, context: FakeContext) -> list[Any]:
    async def collect() -> list[Any]:
        return [reply async for reply in ingress.GenerateStream(request, context)]

    return asyncio.run(collect())


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(["general", "math"])


@pytest.fixture
def ingress(backend: FakeBackend) -> Ingress:
    return Ingress(backend)


def test_routed_generate_carries_text_usage_and_routing(ingress: Ingress) -> None:
    context = FakeContext()
    reply = generate(ingress, ask(model="coe"), context)
    assert context.code is None
    assert reply.text == "math says: what is the sum of 2 and 2"
    assert reply.model == "math"
    assert reply.finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (3, 7)
    assert reply.routing.expert == "math"
    assert reply.routing.category == "math"
    assert reply.routing.routed is True
    assert reply.routing.confidence == pytest.approx(0.9)
    assert dict(context.trailing) == {
        "x-coe-expert": "math",
        "x-coe-category": "math",
        "x-coe-confidence": "0.9000",
        "x-coe-fallback": "false",
    }


def test_empty_model_means_routed_and_named_expert_skips_router(
    ingress: Ingress, backend: FakeBackend
) -> None:
    assert generate(ingress, ask(), FakeContext()).routing.routed is True
    backend.calls.clear()
    reply = generate(ingress, ask(model="general"), FakeContext())
    assert reply.routing.category == "direct"
    assert reply.routing.routed is False
    assert [call[0] for call in backend.calls] == ["generate"]


def test_request_becomes_the_http_body() -> None:
    request = ask(
        "hi", model="math", max_tokens=5, temperature=0.5, top_p=0.9, seed=7, stop=["\n"], user="u"
    )
    request.messages.add(role="assistant", content="hello", name="bot")
    assert chat_body(request) == {
        "model": "math",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "name": "bot"},
        ],
        "max_tokens": 5,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n"],
        "user": "u",
    }
    # Unset optional fields stay unset, so the server's defaults apply as on HTTP.
    assert chat_body(ask("hi")) == {"model": "coe", "messages": [{"role": "user", "content": "hi"}]}


BAD_REQUESTS = [
    ("no messages", coe_pb2.GenerateRequest(model="coe"), "INVALID_ARGUMENT", "messages"),
    ("unknown model", ask(model="gpt-9"), "NOT_FOUND", "gpt-9"),
    ("max_tokens zero", ask(max_tokens=0), "INVALID_ARGUMENT", "max_tokens"),
    ("max_tokens negative", ask(max_tokens=-5), "INVALID_ARGUMENT", "max_tokens"),
    ("max_tokens over limit", ask(max_tokens=2**62), "INVALID_ARGUMENT", "limit of 64"),
    ("prompt too long", ask("x" * 201), "INVALID_ARGUMENT", "limit is 200"),
    ("temperature out of range", ask(temperature=3.0), "INVALID_ARGUMENT", "temperature"),
    ("temperature nan", ask(temperature=float("nan")), "INVALID_ARGUMENT", "temperature"),
    ("top_p zero", ask(top_p=0.0), "INVALID_ARGUMENT", "top_p"),
    ("too many stops", ask(stop=["a", "b", "c", "d", "e"]), "INVALID_ARGUMENT", "stop"),
    ("empty stop", ask(stop=[""]), "INVALID_ARGUMENT", "stop"),
    (
        "bad role",
        coe_pb2.GenerateRequest(messages=[coe_pb2.ChatMessage(role="wizard", content="hi")]),
        "INVALID_ARGUMENT",
        "role",
    ),
    (
        "no user message",
        coe_pb2.GenerateRequest(messages=[coe_pb2.ChatMessage(role="system", content="hi")]),
        "INVALID_ARGUMENT",
        "user message",
    ),
]


@pytest.mark.parametrize(
    ("label", "request_", "code", "fragment"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request_is_rejected_without_side_effects(
    ingress: Ingress,
    backend: FakeBackend,
    label: str,
    request_: coe_pb2.GenerateRequest,
    code: str,
    fragment: str,
) -> None:
    for call in (generate, stream):
        context = FakeContext()
        call(ingress, request_, context)
        assert context.code == getattr(grpc.StatusCode, code), label
        assert fragment in context.details
        assert backend.calls == []  # nothing routed, nothing generated
    good = FakeContext()
    generate(ingress, ask(), good)
    assert good.code is None


def test_stream_sends_routing_then_text_then_finish_and_usage(ingress: Ingress) -> None:
    context = FakeContext()
    replies = stream(ingress, ask(), context)
    assert context.code is None
    assert replies[0].HasField("routing") and replies[0].routing.expert == "math"
    assert not any(reply.HasField("routing") for reply in replies[1:])
    assert "".join(reply.text for reply in replies) == "hello world"
    last = replies[-1]
    assert last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 2)
    assert last.usage.total_tokens == 5
    assert [reply.finish_reason for reply in replies[:-1]] == [""] * (len(replies) - 1)
    assert len({reply.id for reply in replies}) == 1
    assert dict(context.trailing)["x-coe-expert"] == "math"


def test_stream_failure_ends_with_an_error_reply_and_status() -> None:
    ingress = Ingress(FakeBackend(["general", "math"], fail_stream=True))
    context = FakeContext()
    replies = stream(ingress, ask(), context)
    assert replies[-1].finish_reason == "error"
    assert "".join(reply.text for reply in replies) == "hello world"
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert "math" in context.details
    assert "Traceback" not in context.details
    assert dict(context.trailing)["x-coe-expert"] == "math"


def test_route_takes_a_prompt_or_messages(ingress: Ingress, backend: FakeBackend) -> None:
    context = FakeContext()
    reply = asyncio.run(ingress.Route(coe_pb2.RouteRequest(prompt="the sum of all"), context))
    assert context.code is None
    assert (reply.expert, reply.category, reply.fallback) == ("math", "math", False)
    assert dict(reply.scores) == {"math": pytest.approx(0.9)}
    messages = [coe_pb2.ChatMessage(role="user", content="hello")]
    reply = asyncio.run(ingress.Route(coe_pb2.RouteRequest(messages=messages), FakeContext()))
    assert reply.expert == "general"
    assert [call[0] for call in backend.calls] == ["route", "route"]


@pytest.mark.parametrize(
    "request_",
    [
        coe_pb2.RouteRequest(),
        coe_pb2.RouteRequest(prompt="a", messages=[coe_pb2.ChatMessage(role="user", content="b")]),
    ],
    ids=["neither", "both"],
)
def test_route_needs_exactly_one_input(
    ingress: Ingress, backend: FakeBackend, request_: coe_pb2.RouteRequest
) -> None:
    context = FakeContext()
    asyncio.run(ingress.Route(request_, context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "exactly one of prompt or messages" in context.details
    assert backend.calls == []


def test_list_experts(ingress: Ingress) -> None:
    reply = asyncio.run(ingress.ListExperts(coe_pb2.ListExpertsRequest(), FakeContext()))
    assert reply.routed_model == "coe"
    assert list(reply.experts) == ["general", "math"]


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", "Bearer wrong")],
        [("authorization", KEY)],
        [("authorization", f"Basic {KEY}")],
        [("authorization", f"Bearer {KEY}"), ("authorization", "Bearer other")],
        [("x-api-key", KEY)],
    ],
    ids=["missing", "wrong", "no scheme", "basic", "twice", "other header"],
)
def test_without_a_valid_key_every_method_is_refused_alike(
    backend: FakeBackend, metadata: list[tuple[str, str]]
) -> None:
    ingress = Ingress(backend, key=KEY)
    calls = [
        lambda c: generate(ingress, ask(), c),
        lambda c: stream(ingress, ask(), c),
        lambda c: asyncio.run(ingress.Route(coe_pb2.RouteRequest(prompt="x"), c)),
        lambda c: asyncio.run(ingress.ListExperts(coe_pb2.ListExpertsRequest(), c)),
    ]
    for call in calls:
        context = FakeContext(metadata)
        call(context)
        assert context.code == grpc.StatusCode.UNAUTHENTICATED
        assert context.details == "a valid API key is required"
        assert context.trailing == []
    assert backend.calls == []


def test_valid_key_is_admitted_and_health_stays_open(backend: FakeBackend) -> None:
    ingress = Ingress(backend, key=KEY)
    context = FakeContext([("authorization", f"Bearer {KEY}")])
    assert generate(ingress, ask(), context).text.startswith("math says")
    assert context.code is None
    health = FakeContext()
    response = asyncio.run(ingress.Check(health_pb2.HealthCheckRequest(), health))
    assert health.code is None
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_names_its_services(ingress: Ingress) -> None:
    for service in ("", "coe.v1.CoE"):
        response = asyncio.run(
            ingress.Check(health_pb2.HealthCheckRequest(service=service), FakeContext())
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    context = FakeContext()
    asyncio.run(ingress.Check(health_pb2.HealthCheckRequest(service="other.Svc"), context))
    assert context.code == grpc.StatusCode.NOT_FOUND
    listed = asyncio.run(ingress.List(health_pb2.HealthListRequest(), FakeContext()))
    assert set(listed.statuses) == {"", "coe.v1.CoE"}


def test_health_watch_is_unimplemented(ingress: Ingress) -> None:
    context = FakeContext()

    async def first() -> Any:
        return await ingress.Watch(health_pb2.HealthCheckRequest(), context).__anext__()

    with pytest.raises(NotImplementedError):
        asyncio.run(first())
    assert context.code == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (PromptTooLong("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (Unauthorized("x"), grpc.StatusCode.UNAUTHENTICATED),
        (ModelNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (Overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ExpertFailed("x"), grpc.StatusCode.UNAVAILABLE),
        (RequestTimedOut("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (CoEError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(error: CoEError, code: grpc.StatusCode) -> None:
    assert status_code_for(error) == code


class FailingBackend(FakeBackend):
    """Generation fails with a chosen error; routing may blow up unexpectedly."""

    def __init__(self, error: Exception, route_error: Exception | None = None) -> None:
        super().__init__(["general", "math"])
        self.error = error
        self.route_error = route_error

    async def route(self, prompt: str) -> RouteDecision:
        if self.route_error is not None:
            raise self.route_error
        return await super().route(prompt)

    async def generate(self, expert: str, request: GenerationRequest) -> GenerationResult:
        raise self.error

    async def stream(self, expert: str, request: GenerationRequest) -> AsyncIterator[Any]:
        raise self.error
        yield  # makes this an async generator


def test_overload_is_resource_exhausted_with_retry_after() -> None:
    ingress = Ingress(FailingBackend(Overloaded("expert 'math' is busy", retry_after_s=3)))
    for call in (generate, stream):
        context = FakeContext()
        call(ingress, ask(), context)
        assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert context.details == "expert 'math' is busy"
        trailing = dict(context.trailing)
        assert trailing["retry-after"] == "3"


def test_a_dead_router_is_unavailable_with_retry_after() -> None:
    failing = FailingBackend(
        ExpertFailed("unused"), route_error=RouterUnavailable("the router is unavailable", 2)
    )
    context = FakeContext()
    asyncio.run(Ingress(failing).Route(coe_pb2.RouteRequest(prompt="x"), context))
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert dict(context.trailing)["retry-after"] == "2"


def test_unexpected_errors_leak_nothing() -> None:
    secret = RuntimeError("Traceback: /srv/secret/path.py line 3")
    ingress = Ingress(FailingBackend(ExpertFailed("unused"), route_error=secret))
    calls = [
        lambda c: generate(ingress, ask(), c),
        lambda c: stream(ingress, ask(), c),
        lambda c: asyncio.run(ingress.Route(coe_pb2.RouteRequest(prompt="x"), c)),
    ]
    for call in calls:
        context = FakeContext()
        call(context)
        assert context.code == grpc.StatusCode.INTERNAL
        assert context.details == INTERNAL_DETAILS
    # An expert's own exception is reported by type only.
    context = FakeContext()
    generate(Ingress(FailingBackend(ValueError("secret value"))), ask(), context)
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert "secret" not in context.details and "ValueError" in context.details


def test_details_and_metadata_stay_sendable(ingress: Ingress) -> None:
    context = FakeContext()
    # Within the request size bound (a larger body is refused before its model is read).
    generate(ingress, ask(model="m" * 20_000), context)
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert len(context.details) <= MAX_DETAILS_CHARS
    assert metadata_value("plain-ascii 1.0") == "plain-ascii 1.0"
    assert metadata_value("café\n") == "caf%C3%A9%0A"


# --- codegen -------------------------------------------------------------------------

PROBE_PROTO = """syntax = "proto3";
package probe.v1;
service Probe { rpc Echo(Text) returns (Text); }
message Text { string value = 1; }
"""


def test_codegen_builds_an_importable_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proto = tmp_path / "probe.proto"
    proto.write_text(PROBE_PROTO)
    package = tmp_path / "probe_generated"
    assert not grpc_codegen.is_current(proto, package)
    assert grpc_codegen.ensure_generated(proto, package) is True
    assert grpc_codegen.ensure_generated(proto, package) is False  # current: left alone
    service_code = (package / "probe_pb2_grpc.py").read_text()
    assert "from . import probe_pb2 as probe__pb2" in service_code
    assert "\nimport probe_pb2" not in service_code
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("probe_generated.probe_pb2_grpc")
    assert hasattr(module, "add_ProbeServicer_to_server")
    text_class = importlib.import_module("probe_generated.probe_pb2").Text
    assert text_class(value="x").value == "x"
    # Serve pickles messages between its proxy and the replica: the class must be
    # importable under its recorded module name.
    assert text_class.__module__ == "probe_generated.probe_pb2"
    for name in [n for n in sys.modules if n.startswith("probe_generated")]:
        monkeypatch.delitem(sys.modules, name)
    # A changed .proto makes the package stale.
    proto.write_text(PROBE_PROTO.replace("value = 1", "value = 1; string more = 2"))
    assert not grpc_codegen.is_current(proto, package)


def test_codegen_reports_a_bad_proto(tmp_path: Path) -> None:
    proto = tmp_path / "broken.proto"
    proto.write_text('syntax = "proto3";\nmessage {')
    with pytest.raises(grpc_codegen.GrpcCodegenError, match="protoc failed"):
        grpc_codegen.generate(proto, tmp_path / "out")
    with pytest.raises(grpc_codegen.GrpcCodegenError, match="does not exist"):
        grpc_codegen.generate(tmp_path / "missing.proto", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_project_package_is_current_and_importable_by_module_name() -> None:
    assert grpc_codegen.is_current()
    for message in (coe_pb2.GenerateRequest, coe_pb2.GenerateStreamReply, coe_pb2.RouteRequest):
        assert message.__module__ == "cluster.ingress.grpc.generated.coe_pb2"
        assert getattr(importlib.import_module(message.__module__), message.__name__) is message


# --- proxy options and the bind hook ----------------------------------------------------


def test_serve_start_options() -> None:
    assert grpc_proxy.serve_start_options(ServeSettings()) == {}
    options = grpc_proxy.serve_start_options(ServeSettings(grpc_port=9100, request_timeout_s=30))
    assert options["grpc_options"] == {
        "port": 9100,
        "grpc_servicer_functions": grpc_proxy.SERVICER_FUNCTIONS,
        "request_timeout_s": 30,
    }
    env = options["controller_options"]["runtime_env"]["env_vars"]
    assert env == {
        grpc_proxy.RAY_SETUP_HOOK_ENV: "cluster.serve.grpc_proxy.bind_grpc_to_host",
        grpc_proxy.GRPC_HOST_ENV: "127.0.0.1",
    }
    everywhere = grpc_proxy.serve_start_options(ServeSettings(host="0.0.0.0", grpc_port=9100))
    assert "controller_options" not in everywhere


def test_servicer_functions_and_hook_resolve() -> None:
    for path in [*grpc_proxy.SERVICER_FUNCTIONS, grpc_proxy.SETUP_HOOK]:
        assert callable(ray_internals.resolve_import_path(path))


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", "127.0.0.1:9100"), ("::1", "[::1]:9100"), ("0.0.0.0", "[::]:9100")],
)
def test_bind_hook_rewrites_the_proxy_address(
    monkeypatch: pytest.MonkeyPatch, host: str, expected: str
) -> None:
    bound: list[str] = []
    serves_bind = ray_internals.serve_grpc_bind()
    ray_internals.set_serve_grpc_bind(lambda _s, a: bound.append(a))
    try:
        monkeypatch.setenv(grpc_proxy.GRPC_HOST_ENV, host)
        grpc_proxy.bind_grpc_to_host()
        grpc_proxy.bind_grpc_to_host()  # idempotent: wraps once
        server: Any = object()
        ray_internals.serve_grpc_bind()(server, "[::]:9100")
    finally:
        ray_internals.set_serve_grpc_bind(serves_bind)
    assert bound == [expected]


@pytest.mark.parametrize(
    ("host", "listening", "warns"),
    [
        ("127.0.0.1", {"::ffff:127.0.0.1"}, False),
        ("127.0.0.1", {"127.0.0.1"}, False),
        ("127.0.0.1", {"::"}, True),
        ("127.0.0.1", set(), True),
        ("0.0.0.0", {"::"}, False),
    ],
)
def test_check_bind(
    monkeypatch: pytest.MonkeyPatch, host: str, listening: set[str], warns: bool
) -> None:
    monkeypatch.setattr(grpc_proxy, "listening_addresses", lambda port: listening)
    problem = grpc_proxy.check_bind(ServeSettings(host=host, grpc_port=9100))
    assert (problem is not None) == warns
