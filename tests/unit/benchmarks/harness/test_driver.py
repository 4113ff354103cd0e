"""The load-test client and driver against a real OpenAI-style server on 127.0.0.1.

The server (FastAPI under uvicorn, in a thread) answers by the request's model name:
`ok` (non-streaming or SSE, one content chunk per max_tokens), `e429`, `e400`, `e500`,
`slow` (sleeps past the client's timeout), `garbage` (200 with a body that is not
JSON), `stream-error` (an error event inside a 200 stream), `truncated` (a stream that
stops before [DONE]). It counts requests and the peak number in flight.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from benchmarks.harness.client import MULTIPLEX_HEADER, check_loopback
from benchmarks.harness.driver import run_sync
from benchmarks.harness.workload import Planned, Workload, WorkloadError, open_loop
from cluster.config import ServeSettings
from cluster.ingress.http_api import build_http_app
from cluster.ingress.service import CoEService
from tests.unit.fakes import FakeBackend

ANSWER_DELAY_S = 0.02
SLOW_S = 4.0
CLIENT_TIMEOUT_S = 1.5  # far above an answer's time on a loaded 2-core machine


@dataclass
class Seen:
    """What the server received since the last `reset` (requests still running from an
    earlier test belong to an older generation and are not counted)."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    generation: int = 0

    def enter(self, body: dict[str, Any], headers: dict[str, str]) -> int:
        self.bodies.append(body)
        self.headers.append(headers)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return self.generation

    def leave(self, generation: int) -> None:
        if generation == self.generation:
            self.in_flight -= 1

    def reset(self) -> None:
        self.generation += 1
        self.bodies.clear()
        self.headers.clear()
        self.in_flight = 0
        self.peak_in_flight = 0


def _chunk(expert: str, delta: dict[str, str], finish: str | None = None) -> str:
    body = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "coe": {"expert": expert},
    }
    return f"data: {json.dumps(body)}\n\n"


def build_server_app(seen: Seen) -> FastAPI:
    app = FastAPI()

    async def events(expert: str, tokens: int, mode: str, generation: int) -> AsyncIterator[str]:
        try:
            yield _chunk(expert, {"role": "assistant", "content": ""})
            for i in range(tokens):
                await asyncio.sleep(0.002)
                yield _chunk(expert, {"content": f"w{i} "})
                if mode == "stream-error" and i == 1:
                    yield 'data: {"error": {"message": "expert broke", "type": "server_error"}}\n\n'
                    break
            if mode == "truncated":
                return
            yield _chunk(expert, {}, "length")
            yield "data: [DONE]\n\n"
        finally:
            seen.leave(generation)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        generation = seen.enter(body, dict(request.headers))
        model, tokens = body["model"], body["max_tokens"]
        expert = request.headers.get(MULTIPLEX_HEADER, model)
        streaming = False
        try:
            if model in ("e429", "e400", "e500"):
                status = int(model[1:])
                error = {"error": {"message": f"refused with {status}", "type": "x"}}
                return JSONResponse(error, status_code=status)
            if model == "slow":
                await asyncio.sleep(SLOW_S)
            if model == "garbage":
                return PlainTextResponse("this is not json")
            await asyncio.sleep(ANSWER_DELAY_S)
            if body["stream"]:
                streaming = True
                return StreamingResponse(
                    events(expert, tokens, model, generation),
                    media_type="text/event-stream",
                    headers={"x-coe-expert": expert},
                )
            answer = {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"completion_tokens": tokens},
                "coe": {"expert": expert},
            }
            return JSONResponse(answer)
        finally:
            if not streaming:
                seen.leave(generation)

    return app


@dataclass
class LocalServer:
    url: str
    seen: Seen


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """`app` under uvicorn on a free 127.0.0.1 port; yields its base URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the local test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


@pytest.fixture(scope="module")
def local_server() -> Iterator[LocalServer]:
    seen = Seen()
    with serve_in_thread(build_server_app(seen)) as url:
        yield LocalServer(url, seen)


@pytest.fixture
def server(local_server: LocalServer) -> LocalServer:
    local_server.seen.reset()
    return local_server


def planned(index: int, expert: str, stream: bool = False, at_s: float | None = None) -> Planned:
    return Planned(index=index, at_s=at_s, expert=expert, prompt=f"question {index}", stream=stream)


def closed(requests: list[Planned], users: int) -> Workload:
    return Workload(requests=tuple(requests), mode="closed", seed=0, users=users)


def test_outcomes_carry_the_right_kinds(server: LocalServer) -> None:
    cases = [
        ("ok", False, None),
        ("ok", True, None),
        ("e429", False, "http_429"),
        ("e429", True, "http_429"),
        ("e400", False, "http_4xx"),
        ("e500", True, "http_5xx"),
        ("slow", False, "timeout"),
        ("slow", True, "timeout"),
        ("garbage", False, "protocol"),
        ("stream-error", True, "stream_error"),
        ("truncated", True, "protocol"),
    ]
    workload = closed([planned(i, m, s) for i, (m, s, _) in enumerate(cases)], users=len(cases))
    result = run_sync(
        workload, server.url, max_tokens=7, timeout_s=CLIENT_TIMEOUT_S, progress=False
    )
    assert [o.index for o in result.outcomes] == list(range(len(cases)))
    for out, (model, stream, kind) in zip(result.outcomes, cases, strict=True):
        assert (out.expert, out.stream, out.error_kind, out.ok) == (
            model,
            stream,
            kind,
            kind is None,
        )
        assert out.started_s >= 0 and out.total_s >= 0
    statuses = [o.status for o in result.outcomes]
    assert statuses[2:6] == [429, 429, 400, 500]
    assert statuses[6:8] == [None, None]  # no answer before the timeout
    assert result.stopped_by == "exhausted" and result.unsent == 0


def test_streaming_and_plain_answers_are_timed_and_counted(server: LocalServer) -> None:
    workload = closed([planned(0, "ok", stream=True), planned(1, "ok", stream=False)], users=1)
    result = run_sync(workload, server.url, max_tokens=5, timeout_s=5.0, progress=False)
    streamed, plain = result.outcomes
    assert streamed.ok and plain.ok
    assert streamed.tokens == 5  # content chunks; the empty role chunk does not count
    assert plain.tokens == 5  # usage.completion_tokens
    assert streamed.ttft_s is not None and 0 < streamed.ttft_s <= streamed.total_s
    assert plain.ttft_s == plain.total_s
    assert streamed.served_by == "ok" and plain.served_by == "ok"
    assert result.achieved_rps > 0


def test_request_body_and_headers(server: LocalServer) -> None:
    workload = closed([planned(0, "math-expert", stream=True)], users=1)
    run_sync(
        workload,
        server.url,
        max_tokens=3,
        timeout_s=5.0,
        progress=False,
        headers={"x-test": "yes"},
        model="coe",
    )
    (body,) = server.seen.bodies
    assert body == {
        "model": "coe",
        "messages": [{"role": "user", "content": "question 0"}],
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
    }
    (headers,) = server.seen.headers
    assert headers[MULTIPLEX_HEADER] == "math-expert"
    assert headers["x-test"] == "yes"


def test_closed_loop_never_exceeds_its_users(server: LocalServer) -> None:
    users = 3
    workload = closed([planned(i, "ok") for i in range(24)], users=users)
    result = run_sync(workload, server.url, max_tokens=2, timeout_s=5.0, progress=False)
    assert all(o.ok for o in result.outcomes) and len(result.outcomes) == 24
    assert len(server.seen.bodies) == 24
    assert 1 <= server.seen.peak_in_flight <= users
    assert 1 <= result.peak_in_flight <= users


def test_concurrency_overrides_the_workload_users(server: LocalServer) -> None:
    workload = closed([planned(i, "ok") for i in range(6)], users=6)
    result = run_sync(
        workload, server.url, max_tokens=2, timeout_s=5.0, concurrency=1, progress=False
    )
    assert server.seen.peak_in_flight == 1 and result.peak_in_flight == 1
    assert len(result.outcomes) == 6


def test_duration_bound_stops_an_open_loop(server: LocalServer) -> None:
    workload = open_loop(["a prompt"], ["ok"], rate=40.0, count=2000, seed=5)
    duration = 0.5
    result = run_sync(
        workload, server.url, max_tokens=2, timeout_s=5.0, duration_s=duration, progress=False
    )
    assert result.stopped_by == "duration"
    assert 0 < len(result.outcomes) < 2000
    assert result.unsent == 2000 - len(result.outcomes)
    assert all(o.scheduled_s is not None and o.scheduled_s < duration for o in result.outcomes)
    assert len(server.seen.bodies) == len(result.outcomes)
    within = sum(1 for p in workload.requests if p.at_s is not None and p.at_s < duration)
    assert result.offered_rps == pytest.approx(within / duration)


def test_duration_bound_stops_a_closed_loop(server: LocalServer) -> None:
    workload = closed([planned(i, "ok") for i in range(5000)], users=2)
    result = run_sync(
        workload, server.url, max_tokens=2, timeout_s=5.0, duration_s=0.3, progress=False
    )
    assert result.stopped_by == "duration" and result.offered_rps is None
    assert 0 < len(result.outcomes) < 5000
    assert len(server.seen.bodies) == len(result.outcomes)


def test_open_loop_refuses_past_its_in_flight_bound(server: LocalServer) -> None:
    # All ten are due at once; with room for two, eight are refused before any answer.
    requests = tuple(planned(i, "ok", at_s=0.0) for i in range(10))
    workload = Workload(requests=requests, mode="open", seed=0, rate=1.0, span_s=1.0)
    result = run_sync(
        workload, server.url, max_tokens=2, timeout_s=5.0, max_in_flight=2, progress=False
    )
    kinds = [o.error_kind for o in result.outcomes]
    assert kinds.count("client_overload") == 8 and kinds.count(None) == 2
    assert len(server.seen.bodies) == 2


def test_connection_refused_is_an_outcome(unused_port: int) -> None:
    workload = closed([planned(0, "ok"), planned(1, "ok", stream=True)], users=1)
    result = run_sync(
        workload, f"http://127.0.0.1:{unused_port}", max_tokens=2, timeout_s=2.0, progress=False
    )
    assert [o.error_kind for o in result.outcomes] == ["connection", "connection"]
    assert result.achieved_rps == 0


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_on_tick_samples_while_running(server: LocalServer) -> None:
    ticks: list[float] = []
    workload = closed([planned(i, "ok") for i in range(12)], users=1)
    run_sync(
        workload,
        server.url,
        max_tokens=2,
        timeout_s=5.0,
        progress=False,
        on_tick=ticks.append,
        tick_s=0.05,
    )
    assert ticks and ticks == sorted(ticks) and ticks[0] >= 0


def test_a_failing_on_tick_stops_the_run(server: LocalServer) -> None:
    def broken(_: float) -> None:
        raise RuntimeError("sampler broke")

    workload = closed([planned(i, "slow") for i in range(50)], users=1)
    with pytest.raises(RuntimeError, match="sampler broke"):
        run_sync(workload, server.url, max_tokens=2, timeout_s=5.0, progress=False, on_tick=broken)
    assert len(server.seen.bodies) < 50


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8000",
        "http://example.com",
        "http://0.0.0.0:8000",
        "http://[::2]:80",
        "http://127.0.0.1.example.com",
        "ftp://127.0.0.1/",
        "127.0.0.1:8000",
    ],
)
def test_non_loopback_urls_are_refused_before_sending(url: str) -> None:
    with pytest.raises(WorkloadError):
        check_loopback(url)
    ticks: list[float] = []
    with pytest.raises(WorkloadError):
        run_sync(closed([planned(0, "ok")], users=1), url, progress=False, on_tick=ticks.append)
    assert ticks == []


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/", "http://127.9.9.9", "http://localhost:1", "http://[::1]:80"]
)
def test_loopback_urls_are_accepted(url: str) -> None:
    assert check_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"timeout_s": 0.0}, "timeout"),
        ({"duration_s": -1.0}, "duration"),
        ({"tick_s": 0.0}, "tick"),
        ({"concurrency": 0}, "user"),
    ],
)
def test_bad_run_arguments_are_refused(options: dict[str, Any], match: str) -> None:
    with pytest.raises(WorkloadError, match=match):
        run_sync(
            closed([planned(0, "ok")], users=1), "http://127.0.0.1:9", progress=False, **options
        )


def test_concurrency_is_refused_for_an_open_loop() -> None:
    workload = open_loop(["p"], ["ok"], rate=1.0, count=2)
    with pytest.raises(WorkloadError, match="open loop"):
        run_sync(workload, "http://127.0.0.1:9", concurrency=2, progress=False)


# --- against the cluster's own HTTP API (its ingress logic over a fake backend) -------


@pytest.mark.parametrize("fail_stream", [False, True])
def test_the_cluster_http_api_speaks_the_same_protocol(fail_stream: bool) -> None:
    backend = FakeBackend(["general", "math"], fail_stream=fail_stream)
    limits = ServeSettings(max_prompt_chars=200, max_tokens_limit=64, default_max_tokens=16)
    requests = [
        Planned(0, None, "math", "what is the sum of 2 and 2", stream=True),
        Planned(1, None, "general", "write a poem", stream=False),
        Planned(2, None, "nobody", "write a poem", stream=False),
    ]
    with serve_in_thread(build_http_app(CoEService(limits, backend))) as url:
        result = run_sync(closed(requests, 1), url, max_tokens=8, timeout_s=5.0, progress=False)
        routed = run_sync(
            closed(requests[:2], 1), url, max_tokens=8, timeout_s=5.0, progress=False, model="coe"
        )
    streamed, plain, unknown = result.outcomes
    assert unknown.error_kind == "http_4xx" and unknown.status == 404
    assert plain.ok and plain.tokens == 4 and plain.served_by == "general"
    if fail_stream:
        assert streamed.error_kind == "stream_error" and streamed.status == 200
        assert streamed.error is not None and "failed" in streamed.error
    else:
        assert streamed.ok and streamed.tokens == 2 and streamed.served_by == "math"
        assert streamed.ttft_s is not None and streamed.ttft_s <= streamed.total_s
    # Routed by the cluster: the served expert comes back in the header / body.
    assert [o.served_by for o in routed.outcomes if o.ok] == (
        ["general"] if fail_stream else ["math", "general"]
    )
