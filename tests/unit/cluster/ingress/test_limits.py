"""Limits and backpressure over a fake backend: bounds, 429, timeouts, disconnects, and
the observer that sees every chat request exactly once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cluster.config import ServeSettings
from cluster.ingress.api_errors import ExpertFailed, Overloaded, RequestTimedOut
from cluster.ingress.http_api import build_http_app
from cluster.ingress.service import CLIENT_CLOSED, ChatStream, CoEService, max_body_bytes
from router.decision import RouteDecision
from tests.unit.fakes import FakeBackend

LIMITS = ServeSettings(max_prompt_chars=200, max_tokens_limit=64, default_max_tokens=16)
FAST_TIMEOUT = LIMITS.model_copy(update={"request_timeout_s": 0.05})
GOOD = {"model": "coe", "messages": [{"role": "user", "content": "what is the sum of 2 and 2"}]}
STREAM = {**GOOD, "stream": True}


class Recorder:
    """A `RequestObserver` that keeps what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def routed(self, decision: RouteDecision) -> None:
        self.events.append(("routed", decision.expert, decision.category))

    def started(self, expert: str) -> None:
        self.events.append(("started", expert))

    def finished(
        self, expert: str | None, category: str | None, status: int, seconds: float
    ) -> None:
        assert seconds >= 0
        self.events.append(("finished", expert, category, status))

    def finishes(self) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == "finished"]

    def in_flight(self, expert: str) -> int:
        started = sum(1 for e in self.events if e == ("started", expert))
        return started - sum(1 for e in self.finishes() if e[1] == expert)


class HangingRouter(FakeBackend):
    async def route(self, prompt: str) -> RouteDecision:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class BrokenObserver(Recorder):
    def started(self, expert: str) -> None:
        raise RuntimeError("metrics are down")


def app_for(
    backend: FakeBackend, limits: ServeSettings = LIMITS, observer: Recorder | None = None
) -> FastAPI:
    return build_http_app(CoEService(limits, backend, observer))


def events_of(response: Any) -> list[Any]:
    lines = [line for line in response.iter_lines() if line]
    return [
        line.removeprefix("data: ")
        if line == "data: [DONE]"
        else json.loads(line.removeprefix("data: "))
        for line in lines
    ]


# --- every bound answers 400 naming the value and the limit ------------------------------


def chat(client: TestClient, **changes: Any) -> Any:
    return client.post("/v1/chat/completions", json={**GOOD, **changes})


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_prompt_at_the_limit_is_served_one_more_character_is_not() -> None:
    client = TestClient(app_for(FakeBackend(["general", "math"])))
    assert chat(client, messages=user("x" * 200)).status_code == 200
    refused = chat(client, messages=user("x" * 201))
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["message"] == "the conversation has 201 characters; the limit is 200"
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")


def test_prompt_limit_counts_every_message_and_every_text_part() -> None:
    client = TestClient(app_for(FakeBackend(["general", "math"])))
    parts = [{"type": "text", "text": "y" * 100}, {"type": "text", "text": "z" * 50}]
    messages = [
        {"role": "system", "content": "s" * 40},
        {"role": "user", "content": parts},
        {"role": "user", "content": "w" * 11},
    ]
    refused = chat(client, messages=messages)
    assert refused.status_code == 400
    assert "201 characters; the limit is 200" in refused.json()["error"]["message"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_at_the_limit_is_served_above_is_refused_by_name(field: str) -> None:
    backend = FakeBackend(["general", "math"])
    client = TestClient(app_for(backend))
    assert chat(client, **{field: 64}).status_code == 200
    refused = chat(client, **{field: 65})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["message"] == f"{field} 65 exceeds this server's limit of 64"
    assert error["param"] == field


def test_stop_bound_names_the_count() -> None:
    client = TestClient(app_for(FakeBackend(["general", "math"])))
    refused = chat(client, stop=["a", "b", "c", "d", "e"])
    assert refused.status_code == 400
    assert "at most 4 non-empty strings, got 5" in refused.json()["error"]["message"]


def test_route_text_is_bounded_like_a_conversation() -> None:
    backend = FakeBackend(["general", "math"])
    client = TestClient(app_for(backend))
    refused = client.post("/v1/route", json={"prompt": "p" * 201})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == (
        "the text to route has 201 characters; the limit is 200"
    )
    assert backend.calls == []
    assert client.post("/v1/route", json={"prompt": "p" * 200}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/route"])
def test_oversized_body_is_refused_before_parsing(path: str) -> None:
    backend = FakeBackend(["general", "math"])
    client = TestClient(app_for(backend))
    limit = max_body_bytes(LIMITS)
    refused = client.post(
        path, content=b" " * (limit + 1), headers={"content-type": "application/json"}
    )
    assert refused.status_code == 413
    error = refused.json()["error"]
    assert f"exceeds the limit of {limit} bytes" in error["message"]
    assert error["code"] == "request_too_large"
    assert backend.calls == []


def test_body_limit_leaves_room_for_any_prompt_within_the_limit() -> None:
    # The worst case: every character an escaped astral code point (12 bytes).
    body = json.dumps({**GOOD, "messages": user("\U0001f600" * 200)}).encode()
    assert len(body) <= max_body_bytes(LIMITS)
    client = TestClient(app_for(FakeBackend(["general", "math"])))
    response = client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200


# --- overload: 429 with Retry-After, streamed or not ------------------------------------


@pytest.mark.parametrize("body", [GOOD, STREAM], ids=["whole", "stream"])
def test_overload_is_429_with_retry_after(body: dict[str, Any]) -> None:
    refusal = Overloaded("expert 'math' has too many queued requests; retry later", 7)
    client = TestClient(app_for(FakeBackend(["general", "math"], refuse=refusal)))
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
    assert "too many queued requests" in error["message"]


def test_a_stream_that_dies_before_its_first_token_is_an_http_error() -> None:
    client = TestClient(app_for(FakeBackend(["general", "math"], refuse=RuntimeError("gone"))))
    response = client.post("/v1/chat/completions", json=STREAM)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["message"] == "expert 'math' failed: RuntimeError"


def test_overloaded_rejects_a_negative_retry_after() -> None:
    with pytest.raises(ValueError, match="-1"):
        Overloaded("full", retry_after_s=-1)


# --- the per-request timeout ------------------------------------------------------------


def test_slow_generation_times_out_with_504_and_is_cancelled() -> None:
    backend = FakeBackend(["general", "math"], hang_generate=True)
    response = TestClient(app_for(backend, FAST_TIMEOUT)).post("/v1/chat/completions", json=GOOD)
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "timeout"
    assert "request_timeout_s=0.05 seconds" in error["message"]
    assert backend.cancelled == ["math"]  # the expert's slot is given back


def test_slow_routing_counts_toward_the_timeout() -> None:
    observer = Recorder()
    backend = HangingRouter(["general", "math"])
    client = TestClient(app_for(backend, FAST_TIMEOUT, observer))
    assert client.post("/v1/chat/completions", json=GOOD).status_code == 504
    assert observer.events == [("finished", None, None, 504)]


def test_stream_without_a_first_token_in_time_is_a_504() -> None:
    backend = FakeBackend(["general", "math"], hang_stream_after=0)
    response = TestClient(app_for(backend, FAST_TIMEOUT)).post("/v1/chat/completions", json=STREAM)
    assert response.status_code == 504
    assert backend.closed_streams == ["math"]


def test_stream_past_its_deadline_ends_with_an_error_event_and_done() -> None:
    observer = Recorder()
    backend = FakeBackend(["general", "math"], hang_stream_after=1)
    client = TestClient(app_for(backend, FAST_TIMEOUT, observer))
    with client.stream("POST", "/v1/chat/completions", json=STREAM) as response:
        assert response.status_code == 200
        events = events_of(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "timeout"
    assert events[1]["choices"][0]["delta"] == {"content": "hello"}
    assert backend.closed_streams == ["math"]
    assert observer.finishes() == [("finished", "math", "math", 504)]


# --- a client that goes away frees its expert -------------------------------------------


def http_scope(spec_version: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
    }


async def disconnect_after_first_token(
    app: FastAPI, how: str, spec_version: str = "2.4"
) -> list[MutableMapping[str, Any]]:
    """Run one streamed request; once "hello" went out, go away the way `how` says:
    `cancel` (Serve cancels the request's task), `cancel-during-send` (the same while
    the response is blocked sending), or `disconnect` (an http.disconnect message)."""
    sent: list[MutableMapping[str, Any]] = []
    got_token, gone = asyncio.Event(), asyncio.Event()
    body = json.dumps(STREAM).encode()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        if b"hello" in message.get("body", b""):
            got_token.set()
            if how == "cancel-during-send":
                await asyncio.Event().wait()  # the client stopped reading

    task = asyncio.ensure_future(app(http_scope(spec_version), receive, send))
    await asyncio.wait_for(got_token.wait(), timeout=10)
    if how == "disconnect":
        gone.set()
        await asyncio.wait_for(task, timeout=10)
    else:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    return sent


@pytest.mark.parametrize(
    ("how", "hang_after", "spec_version"),
    [
        ("cancel", 1, "2.4"),  # waiting on the expert
        ("cancel-during-send", None, "2.4"),  # parked at a yield: only a close reaches it
        ("disconnect", 1, "2.0"),  # Starlette watches for the disconnect itself
    ],
)
def test_client_that_goes_away_closes_the_expert_stream(
    how: str, hang_after: int | None, spec_version: str
) -> None:
    observer = Recorder()
    backend = FakeBackend(["general", "math"], hang_stream_after=hang_after)
    app = app_for(backend, observer=observer)

    async def scenario() -> None:
        sent = await disconnect_after_first_token(app, how, spec_version)
        assert sent[0]["status"] == 200
        # Checked before anything else runs: no garbage collector did this.
        assert backend.closed_streams == ["math"]
        assert observer.finishes() == [("finished", "math", "math", CLIENT_CLOSED)]
        assert observer.in_flight("math") == 0

    asyncio.run(scenario())


def test_handle_stream_closed_early_closes_the_expert_stream() -> None:
    observer = Recorder()
    backend = FakeBackend(["general", "math"])
    service = CoEService(LIMITS, backend, observer)

    async def scenario() -> None:
        stream = await service.open_stream(GOOD)
        first = await anext(stream)
        assert first["choices"][0]["delta"]["role"] == "assistant"
        await stream.aclose()
        assert backend.closed_streams == ["math"]  # at once, not when collected
        assert [chunk async for chunk in stream] == []  # a closed stream stays closed
        await stream.aclose()  # and closing twice is harmless

    asyncio.run(scenario())
    assert observer.finishes() == [("finished", "math", "math", CLIENT_CLOSED)]


# --- the observer sees every chat request exactly once ----------------------------------


def observed(backend: FakeBackend, body: Any, limits: ServeSettings = LIMITS) -> Recorder:
    observer = Recorder()
    client = TestClient(app_for(backend, limits, observer))
    if isinstance(body, bytes):
        client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    else:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.read()
    return observer


EXPERTS = ["general", "math"]
CASES: list[tuple[str, FakeBackend, Any, ServeSettings, list[tuple[Any, ...]]]] = [
    (
        "routed",
        FakeBackend(EXPERTS),
        GOOD,
        LIMITS,
        [("routed", "math", "math"), ("started", "math"), ("finished", "math", "math", 200)],
    ),
    (
        "direct",
        FakeBackend(EXPERTS),
        {**GOOD, "model": "general"},
        LIMITS,
        [
            ("routed", "general", "direct"),
            ("started", "general"),
            ("finished", "general", "direct", 200),
        ],
    ),
    (
        "stream",
        FakeBackend(EXPERTS),
        STREAM,
        LIMITS,
        [("routed", "math", "math"), ("started", "math"), ("finished", "math", "math", 200)],
    ),
    ("malformed json", FakeBackend(EXPERTS), b"{nope", LIMITS, [("finished", None, None, 400)]),
    (
        "validation",
        FakeBackend(EXPERTS),
        {**GOOD, "max_tokens": 65},
        LIMITS,
        [("finished", None, None, 400)],
    ),
    (
        "unknown model",
        FakeBackend(EXPERTS),
        {**GOOD, "model": "gpt-9"},
        LIMITS,
        [("finished", None, None, 404)],
    ),
    (
        "overloaded",
        FakeBackend(EXPERTS, refuse=Overloaded("full", 1)),
        GOOD,
        LIMITS,
        [("routed", "math", "math"), ("started", "math"), ("finished", "math", "math", 429)],
    ),
    (
        "overloaded stream",
        FakeBackend(EXPERTS, refuse=Overloaded("full", 1)),
        STREAM,
        LIMITS,
        [("routed", "math", "math"), ("started", "math"), ("finished", "math", "math", 429)],
    ),
    (
        "stream fails midway",
        FakeBackend(EXPERTS, fail_stream=True),
        STREAM,
        LIMITS,
        [("routed", "math", "math"), ("started", "math"), ("finished", "math", "math", 503)],
    ),
    (
        "timeout",
        FakeBackend(EXPERTS, hang_generate=True),
        GOOD,
        FAST_TIMEOUT,
        [("routed", "math", "math"), ("started", "math"), ("finished", "math", "math", 504)],
    ),
]


@pytest.mark.parametrize(
    ("label", "backend", "body", "limits", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_observer_sees_each_request_exactly_once(
    label: str,
    backend: FakeBackend,
    body: Any,
    limits: ServeSettings,
    expected: list[tuple[Any, ...]],
) -> None:
    observer = observed(backend, body, limits)
    assert observer.events == expected
    assert observer.in_flight("math") == 0 and observer.in_flight("general") == 0


def test_unexpected_failure_is_a_500_that_says_nothing() -> None:
    class Exploding(FakeBackend):
        async def route(self, prompt: str) -> RouteDecision:
            raise KeyError("secret internals")

    observer = Recorder()
    client = TestClient(
        app_for(Exploding(EXPERTS), observer=observer), raise_server_exceptions=False
    )
    response = client.post("/v1/chat/completions", json=GOOD)
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "internal server error"
    assert "secret" not in response.text
    assert observer.events == [("finished", None, None, 500)]


def test_a_broken_observer_never_fails_the_request() -> None:
    observer = BrokenObserver()
    client = TestClient(app_for(FakeBackend(EXPERTS), observer=observer))
    assert client.post("/v1/chat/completions", json=GOOD).status_code == 200
    assert observer.finishes() == [("finished", "math", "math", 200)]


def test_handle_api_is_observed_and_timed_like_http() -> None:
    observer = Recorder()
    service = CoEService(FAST_TIMEOUT, FakeBackend(EXPERTS, hang_generate=True), observer)
    with pytest.raises(RequestTimedOut, match=r"request_timeout_s=0\.05"):
        asyncio.run(service.chat(GOOD))
    streaming = CoEService(LIMITS, FakeBackend(EXPERTS, refuse=RuntimeError("x")), observer)
    with pytest.raises(ExpertFailed):
        asyncio.run(streaming.open_stream(GOOD))

    async def whole_stream() -> list[dict[str, Any]]:
        stream = await CoEService(LIMITS, FakeBackend(EXPERTS), observer).open_stream(GOOD)
        assert isinstance(stream, ChatStream)
        return [chunk async for chunk in stream]

    chunks = asyncio.run(whole_stream())
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert [e[3] for e in observer.finishes()] == [504, 503, 200]
