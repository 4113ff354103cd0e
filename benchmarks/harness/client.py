"""One OpenAI chat request, timed; a failure is an `Outcome`, never an exception.

    async with httpx.AsyncClient(trust_env=False) as client:
        outcome = await send(client, "http://127.0.0.1:8000", planned, max_tokens=32,
                             timeout_s=30.0)

The body is `{"model", "messages": [user prompt], "max_tokens", "temperature": 0,
"stream"}` to `{base_url}/v1/chat/completions`, with the header
`serve_multiplexed_model_id: <expert>` (Ray Serve's multiplexing routes on it; other
servers ignore it).

Timing: `ttft_s` is the time to the first SSE chunk whose delta has non-empty content
(a stream that ends without content, and every non-streaming request, has
`ttft_s == total_s`). `tokens` is `usage.completion_tokens` when the server reports it,
else the number of content chunks. `text` is the answer (the streamed deltas joined),
so a benchmark can compare it with a reference; None when the request failed.

Error kinds: `http_429`, `http_4xx`, `http_5xx` (by status), `timeout` (no complete
answer within `timeout_s`, connecting included), `connection` (refused, reset),
`stream_error` (an error event inside a 200 stream), `protocol` (a malformed answer:
not JSON, no choices, a stream that closes before `[DONE]`). The driver adds
`client_overload` for requests it refused to start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from benchmarks.harness.workload import Planned, WorkloadError

ErrorKind = Literal[
    "http_4xx",
    "http_429",
    "http_5xx",
    "timeout",
    "connection",
    "stream_error",
    "protocol",
    "client_overload",
]
MULTIPLEX_HEADER = "serve_multiplexed_model_id"
SERVED_BY_HEADER = "x-coe-expert"
CHAT_PATH = "/v1/chat/completions"
_MESSAGE_CHARS = 300


@dataclass(frozen=True)
class Outcome:
    """What happened to one planned request. Times are seconds; `started_s` counts from
    the run's start, `ttft_s` and `total_s` from this request's start."""

    index: int
    expert: str
    stream: bool
    ok: bool
    status: int | None
    error_kind: ErrorKind | None
    started_s: float
    ttft_s: float | None
    total_s: float
    tokens: int
    served_by: str | None
    scheduled_s: float | None = None  # the planned send time (open loop)
    error: str | None = None
    text: str | None = None  # the answer's content (successful requests only)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def check_loopback(base_url: str) -> str:
    """`base_url` without a trailing slash if it is http(s) on this machine
    (127.0.0.0/8, ::1 or `localhost`); a `WorkloadError` otherwise."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https"):
        raise WorkloadError(f"base URL {base_url!r} must be http:// or https://")
    host = (parts.hostname or "").rstrip(".").lower()
    if host != "localhost":
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise WorkloadError(
                f"base URL {base_url!r}: host {host!r} is not a loopback address; load tests "
                "only target this machine (127.0.0.0/8, ::1, localhost)"
            ) from None
        if not address.is_loopback:
            raise WorkloadError(
                f"base URL {base_url!r}: {host} is not a loopback address; load tests only "
                "target this machine (127.0.0.0/8, ::1, localhost)"
            )
    return base_url.rstrip("/")


def request_body(planned: Planned, max_tokens: int, model: str | None = None) -> dict[str, Any]:
    return {
        "model": model or planned.expert,
        "messages": [{"role": "user", "content": planned.prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": planned.stream,
    }


class _Failure(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


@dataclass
class _Progress:
    """Filled while the request runs, so a timeout still knows what had arrived."""

    start: float
    status: int | None = None
    first_token_at: float | None = None
    content_chunks: int = 0
    usage_tokens: int | None = None
    served_by: str | None = None
    text: list[str] = field(default_factory=list)


def _status_kind(status: int) -> ErrorKind:
    if status == 429:
        return "http_429"
    if 400 <= status < 500:
        return "http_4xx"
    if status >= 500:
        return "http_5xx"
    return "protocol"


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
        message = body["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return raw.decode("utf-8", "replace")


def _served_by(body: dict[str, Any]) -> str | None:
    coe = body.get("coe")
    if isinstance(coe, dict) and isinstance(coe.get("expert"), str):
        return str(coe["expert"])
    return None


def _usage_tokens(body: dict[str, Any]) -> int | None:
    usage = body.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return int(usage["completion_tokens"])
    return None


def _note_headers(response: httpx.Response, progress: _Progress) -> None:
    progress.status = response.status_code
    progress.served_by = response.headers.get(SERVED_BY_HEADER)


def _chunk_content(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise _Failure("protocol", "stream chunk without a 'choices' list")
    text = ""
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str):
            text += content
    return text


async def _read_stream(response: httpx.Response, progress: _Progress) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, `event:` lines
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            raise _Failure("protocol", f"stream event is not JSON: {payload[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise _Failure("protocol", "stream event is not a JSON object")
        if "error" in chunk:
            raise _Failure("stream_error", _error_message(payload.encode()))
        progress.served_by = progress.served_by or _served_by(chunk)
        usage = _usage_tokens(chunk)
        if usage is not None:
            progress.usage_tokens = usage
        content = _chunk_content(chunk)
        if content:
            progress.text.append(content)
            progress.content_chunks += 1
            if progress.first_token_at is None:
                progress.first_token_at = time.monotonic()
    raise _Failure("protocol", "stream ended before [DONE]")


async def _exchange(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    progress: _Progress,
) -> None:
    if body["stream"]:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            _note_headers(response, progress)
            if response.status_code != 200:
                await response.aread()
                raise _Failure(_status_kind(response.status_code), _error_message(response.content))
            await _read_stream(response, progress)
        return
    response = await client.post(url, json=body, headers=headers)
    _note_headers(response, progress)
    if response.status_code != 200:
        raise _Failure(_status_kind(response.status_code), _error_message(response.content))
    try:
        answer = response.json()
    except ValueError:
        raise _Failure("protocol", f"answer is not JSON: {response.text[:80]!r}") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        raise _Failure("protocol", "answer has no 'choices' list")
    progress.served_by = progress.served_by or _served_by(answer)
    progress.usage_tokens = _usage_tokens(answer)
    progress.text.append(_message_content(answer))


def _message_content(answer: dict[str, Any]) -> str:
    """The first choice's message content ('' when it has none)."""
    choices = answer["choices"]
    message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


async def send(
    client: httpx.AsyncClient,
    base_url: str,
    planned: Planned,
    max_tokens: int,
    timeout_s: float,
    headers: Mapping[str, str] | None = None,
    *,
    run_start: float | None = None,
    model: str | None = None,
) -> Outcome:
    """Send `planned` and time it. `run_start` is the run's `time.monotonic()` origin
    (None: this request's start). `model` replaces `planned.expert` in the body (e.g.
    "coe" to let the server route); the multiplexing header always names the expert.
    `base_url` must already have passed `check_loopback`."""
    progress = _Progress(start=time.monotonic())
    started_s = progress.start - (progress.start if run_start is None else run_start)
    all_headers = {**(headers or {}), MULTIPLEX_HEADER: planned.expert}
    body = request_body(planned, max_tokens, model)
    kind: ErrorKind | None = None
    message: str | None = None
    try:
        await asyncio.wait_for(
            _exchange(client, base_url + CHAT_PATH, body, all_headers, progress), timeout_s
        )
    except _Failure as failure:
        kind, message = failure.kind, str(failure)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        kind, message = "timeout", f"no complete answer within {timeout_s} s"
    except httpx.RemoteProtocolError as error:
        kind, message = "protocol", str(error) or type(error).__name__
    except httpx.TransportError as error:
        kind, message = "connection", str(error) or type(error).__name__
    except Exception as error:  # a load test records every failure, whatever its type
        kind, message = "protocol", f"{type(error).__name__}: {error}"
    end = time.monotonic()
    total_s = end - progress.start
    ok = kind is None
    if progress.first_token_at is not None:
        ttft_s: float | None = progress.first_token_at - progress.start
    else:
        ttft_s = total_s if ok else None
    return Outcome(
        index=planned.index,
        expert=planned.expert,
        stream=planned.stream,
        ok=ok,
        status=progress.status,
        error_kind=kind,
        started_s=started_s,
        ttft_s=ttft_s,
        total_s=total_s,
        tokens=progress.usage_tokens
        if progress.usage_tokens is not None
        else progress.content_chunks,
        served_by=progress.served_by,
        scheduled_s=planned.at_s,
        error=message[:_MESSAGE_CHARS] if message else None,
        text="".join(progress.text) if ok else None,
    )
