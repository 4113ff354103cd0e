"""The ingress's logic without Ray: validate, route, dispatch, shape OpenAI responses.

`CoEService` talks to the router and the experts through a `Backend`; the Serve
ingress supplies one made of deployment handles, unit tests a fake one. Both the
HTTP API and Python handle callers go through the same methods, so they get the
same validation, the same errors, the same limits and the same bodies.

A chat or text completion (`respond`, `chat`, `open_stream`, `text_completion`,
`open_text_stream`) is bounded by `serve.request_timeout_s` from its first byte to its
last chunk, and reported to an optional `RequestObserver` exactly once, however it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from actors.engines.base import (
    ContextLengthExceeded,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
)
from cluster.config import ROUTED_MODEL, ServeSettings
from cluster.ingress.api_errors import (
    CoEError,
    ExpertFailed,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    PromptTooLong,
    RequestTimedOut,
    RequestTooLarge,
)
from cluster.ingress.openai_api import (
    MAX_STOPS,
    AnyCompletionRequest,
    ChatCompletionRequest,
    CompletionRequest,
    RouteRequest,
    parse_request,
    refuse_lone_surrogates,
    refuse_too_many_messages,
    to_generation_request,
)
from cluster.ingress.shapes import CHAT, TEXT, Shape, models_body, routing_headers, usage_body
from router.decision import RouteDecision

logger = logging.getLogger(__name__)
T = TypeVar("T")
Kind = Literal["chat", "text"]
REQUESTS: dict[Kind, tuple[type[AnyCompletionRequest], Shape]] = {
    "chat": (ChatCompletionRequest, CHAT),
    "text": (CompletionRequest, TEXT),
}

# The status a request gets when its client went away first (nginx's convention).
CLIENT_CLOSED = 499
# A JSON body may spend up to 12 bytes per character ("\\ud83d\\ude00" is one
# character), plus room for the fields around the messages.
BODY_BYTES_PER_CHAR = 12
BODY_OVERHEAD_BYTES = 64 * 1024


class Backend(Protocol):
    """How the service reaches the router and the experts.

    Cancelling `generate`, or closing / cancelling the iterator `stream` returns,
    must cancel the expert's work, so that its slot is free for the next request.
    """

    expert_names: list[str]

    async def route(self, prompt: str) -> RouteDecision: ...

    async def generate(self, expert: str, request: GenerationRequest) -> GenerationResult: ...

    def stream(self, expert: str, request: GenerationRequest) -> AsyncIterator[StreamChunk]: ...


class RequestObserver(Protocol):
    """What metrics see of chat requests.

    `finished` is called exactly once per chat request, with the status its client
    got (200, a `CoEError`'s status, 500 for anything unexpected, 499 when the
    client went away); `expert` is None when the request never reached one
    (refused by validation, or routing failed). `started` and `finished` with an
    expert pair up, so started - finished is the number in flight per expert.
    """

    def routed(self, decision: RouteDecision) -> None: ...

    def started(self, expert: str) -> None: ...

    def finished(
        self, expert: str | None, category: str | None, status: int, seconds: float
    ) -> None: ...


@dataclass(frozen=True)
class Prepared:
    """A validated chat or text completion request with its routing decision."""

    request: AnyCompletionRequest
    generation: GenerationRequest
    decision: RouteDecision
    shape: Shape = CHAT

    @property
    def headers(self) -> dict[str, str]:
        return routing_headers(self.decision)


@dataclass(frozen=True)
class Completion:
    """A whole (non-streamed) completion and the headers it goes out with."""

    body: dict[str, Any]
    headers: dict[str, str]


def direct_decision(expert: str) -> RouteDecision:
    """A request that names its expert skips the router; say so in the metadata."""
    return RouteDecision(
        expert=expert, category="direct", confidence=1.0, fallback=False, scores={}
    )


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


def status_of(error: BaseException) -> int:
    """The HTTP status a client sees for a request that ended with `error`."""
    if isinstance(error, CoEError):
        return error.status_code
    if isinstance(error, asyncio.CancelledError):
        return CLIENT_CLOSED
    return 500


def max_body_bytes(limits: ServeSettings) -> int:
    """The largest JSON body a request within `max_prompt_chars` and `max_stop_chars`
    can need."""
    chars = limits.max_prompt_chars + MAX_STOPS * limits.max_stop_chars
    return chars * BODY_BYTES_PER_CHAR + BODY_OVERHEAD_BYTES


def _expert_error(expert: str, error: Exception) -> CoEError:
    """What a client sees of an expert's exception: the expert's refusal of its request
    (prompt and budget past the context window: the client's 400), else a failed expert.
    Through Serve the refusal is a `RayTaskError` that is also a `ContextLengthExceeded`
    and reads its attributes from the original, so `message` is the expert's own."""
    if isinstance(error, ContextLengthExceeded):
        return PromptTooLong(error.message, param=error.part)
    return ExpertFailed(f"expert {expert!r} failed: {type(error).__name__}")


def _json_size_exceeds(body: Any, limit: int) -> bool:
    """Whether `body` written as escaped JSON (the HTTP worst case: every character as
    ASCII escapes) is longer than `limit` bytes; stops reading once it is."""
    # Values JSON cannot hold count as null here; validation refuses them afterwards.
    encoder = json.JSONEncoder(ensure_ascii=True, default=lambda _value: None)
    size = 0
    try:
        for piece in encoder.iterencode(body):
            size += len(piece)
            if size > limit:
                return True
    except RecursionError:
        raise InvalidRequest("request body nests too deeply") from None
    except (TypeError, ValueError) as error:  # a non-string key, a cycle, a huge integer
        raise InvalidRequest(f"request body is not JSON: {error}") from None
    return False


class _Ticket:
    """One chat request as its observer sees it; `finish` reports only the first time."""

    def __init__(self, observer: RequestObserver | None) -> None:
        self._observer = observer
        self._began = time.perf_counter()
        self.expert: str | None = None
        self.category: str | None = None
        self.done = False

    def dispatch(self, decision: RouteDecision) -> None:
        self._notify("routed", decision)
        self.expert, self.category = decision.expert, decision.category
        self._notify("started", decision.expert)

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        seconds = time.perf_counter() - self._began
        self._notify("finished", self.expert, self.category, status, seconds)

    def _notify(self, event: str, *args: Any) -> None:
        if self._observer is None:
            return
        try:
            getattr(self._observer, event)(*args)
        except Exception:  # metrics must never fail the request they measure
            logger.exception("request observer failed in %s", event)


class _Deadline:
    """The point in time a request must be done by; awaits past it are cancelled."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.at = asyncio.get_running_loop().time() + limit_s

    async def run(self, awaitable: Awaitable[T]) -> T:
        timeout = asyncio.timeout_at(self.at)
        try:
            async with timeout:
                return await awaitable
        except TimeoutError:
            if not timeout.expired():
                raise  # the backend's own timeout, not ours
            raise RequestTimedOut(
                f"the request did not finish within request_timeout_s={self.limit_s:g} seconds"
            ) from None


class ChatStream:
    """A streamed (chat or text) completion whose first chunk has already arrived.

    Whatever went wrong before that chunk (validation, overload, a timeout, a dead
    expert) was raised by `open_stream` as a `CoEError`, so an HTTP client gets a
    real status. Iterating yields OpenAI chunk objects; a failure after the first
    chunk is raised as a `CoEError`. A consumer that stops early must `aclose()`
    the stream: that closes the expert's stream and frees its slot.
    """

    def __init__(
        self,
        prepared: Prepared,
        first: dict[str, Any],
        rest: AsyncGenerator[dict[str, Any], None],
        ticket: _Ticket,
        deadline: _Deadline,
    ) -> None:
        self.prepared = prepared
        self._first: dict[str, Any] | None = first
        self._rest = rest
        self._ticket = ticket
        self._deadline = deadline

    @property
    def headers(self) -> dict[str, str]:
        return self.prepared.headers

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._ticket.done:
            raise StopAsyncIteration
        try:
            return await self._deadline.run(anext(self._rest))
        except StopAsyncIteration:
            self._ticket.finish(200)
            raise
        except BaseException as error:
            self._ticket.finish(status_of(error))
            raise

    async def aclose(self) -> None:
        """Stop the stream; a stream closed before its end counts as a client gone."""
        self._ticket.finish(CLIENT_CLOSED)
        await self._rest.aclose()


class CoEService:
    def __init__(
        self,
        limits: ServeSettings,
        backend: Backend,
        observer: RequestObserver | None = None,
    ) -> None:
        self.limits = limits
        self.backend = backend
        self.observer = observer

    @property
    def max_body_bytes(self) -> int:
        return max_body_bytes(self.limits)

    def models(self) -> dict[str, Any]:
        return models_body(list(self.backend.expert_names))

    def decode(self, body: Any) -> Any:
        """A JSON body: raw bytes are size-checked and parsed; an already decoded body
        (gRPC, a handle call) gets the same bound on its size as JSON."""
        if not isinstance(body, bytes | bytearray):
            if _json_size_exceeds(body, self.max_body_bytes):
                raise RequestTooLarge(
                    f"the request exceeds the limit of {self.max_body_bytes} bytes as JSON "
                    f"(max_prompt_chars is {self.limits.max_prompt_chars})"
                )
            return body
        if len(body) > self.max_body_bytes:
            raise PayloadTooLarge(
                f"the request body exceeds the limit of {self.max_body_bytes} bytes "
                f"(max_prompt_chars is {self.limits.max_prompt_chars})"
            )
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidRequest(f"request body is not valid JSON: {error}") from None
        except RecursionError:
            # Python's parser recurses per nesting level; no request nests this deep.
            raise InvalidRequest("request body nests too deeply") from None
        except ValueError:
            # The only other ValueError: an integer longer than Python will convert.
            raise InvalidRequest(
                f"request body holds an integer of more than {sys.get_int_max_str_digits()} digits"
            ) from None

    async def route(self, body: Any) -> dict[str, Any]:
        request: RouteRequest = parse_request(RouteRequest, self.decode(body))
        text = request.routing_text()
        if len(text) > self.limits.max_prompt_chars:
            raise PromptTooLong(
                f"the text to route has {len(text)} characters; "
                f"the limit is {self.limits.max_prompt_chars}",
                param="prompt" if request.prompt is not None else "messages",
            )
        if request.messages is not None:
            refuse_too_many_messages(len(request.messages), self.limits)
        refuse_lone_surrogates(request.texts())
        decision = await self.backend.route(text)
        return decision.to_dict()

    async def prepare(self, body: Any, kind: Kind = "chat") -> Prepared:
        """Validate and route; raises a typed 4xx error before any expert is touched."""
        model, shape = REQUESTS[kind]
        request: AnyCompletionRequest = parse_request(model, self.decode(body))
        if request.model != ROUTED_MODEL and request.model not in self.backend.expert_names:
            raise ModelNotFound(
                f"model {request.model!r} does not exist; use 'coe' or one of "
                f"{sorted(self.backend.expert_names)}",
                param="model",
            )
        generation = to_generation_request(request, self.limits)
        if request.model == ROUTED_MODEL:
            decision = await self.backend.route(request.routing_text())
        else:
            decision = direct_decision(request.model)
        return Prepared(request, generation, decision, shape)

    async def complete(self, prepared: Prepared) -> dict[str, Any]:
        """Dispatch a prepared request and shape the answer (no timeout, no observer)."""
        try:
            result = await self.backend.generate(prepared.decision.expert, prepared.generation)
        except CoEError:
            raise
        except Exception as error:
            raise _expert_error(prepared.decision.expert, error) from error
        return prepared.shape.whole(result, prepared.decision, prepared.request.model)

    async def stream_chunks(self, prepared: Prepared) -> AsyncGenerator[dict[str, Any], None]:
        """OpenAI chunk objects for a streamed completion (no timeout, no observer).

        Nothing is yielded before the expert's first chunk arrives, so a refusal or
        failure before it surfaces at the first `anext`. Closing this generator
        closes the expert's stream. With vLLM's continuous usage every chunk carries
        the usage so far (the engines count tokens as they stream).
        """
        decision, model, shape = prepared.decision, prepared.request.model, prepared.shape
        completion_id = shape.new_id()
        every = prepared.request.usage_on_every_chunk

        def counted(chunk: dict[str, Any], prompt_tokens: int, tokens: int) -> dict[str, Any]:
            if every:
                chunk["usage"] = usage_body(prompt_tokens, tokens)
            return chunk

        final: StreamChunk | None = None
        opened = False
        source = self.backend.stream(decision.expert, prepared.generation)
        try:
            async for chunk in source:
                if not opened:
                    opened = True
                    opening = shape.opening(completion_id, decision, model)
                    if opening is not None:
                        yield counted(opening, chunk.prompt_tokens, 0)
                if chunk.text:
                    piece = shape.text_piece(completion_id, decision, model, chunk.text)
                    yield counted(piece, chunk.prompt_tokens, chunk.completion_tokens)
                if chunk.finish_reason is not None:
                    final = chunk
        except CoEError:
            raise
        except Exception as error:
            raise _expert_error(decision.expert, error) from error
        finally:
            # `async for` leaves an abandoned source suspended; close it explicitly.
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()
        if final is None:
            raise ExpertFailed(f"expert {decision.expert!r} ended the stream without finishing")
        last = shape.text_piece(completion_id, decision, model, "", final.finish_reason)
        yield counted(last, final.prompt_tokens, final.completion_tokens)
        if prepared.request.usage_at_end:
            yield shape.usage_chunk(
                completion_id, decision, final.prompt_tokens, final.completion_tokens
            )

    async def respond(
        self, body: Any, stream: bool | None = None, kind: Kind = "chat"
    ) -> Completion | ChatStream:
        """One chat (or, with kind "text", text) completion end to end: a `Completion`,
        or a `ChatStream` when the request asks to stream (`stream` overrides the
        request's own flag).

        `body` is the decoded JSON or its raw bytes. Every failure before the answer
        (or its first chunk) is raised as a `CoEError`.
        """
        ticket = _Ticket(self.observer)
        try:
            deadline = _Deadline(self.limits.request_timeout_s)
            prepared = await deadline.run(self.prepare(body, kind))
            streaming = prepared.request.stream if stream is None else stream
            ticket.dispatch(prepared.decision)
            if streaming:
                return await self._open(prepared, ticket, deadline)
            answer = await deadline.run(self.complete(prepared))
        except BaseException as error:
            ticket.finish(status_of(error))
            raise
        ticket.finish(200)
        return Completion(answer, prepared.headers)

    async def chat(self, body: Any) -> dict[str, Any]:
        """A whole non-streaming chat completion (the handle API)."""
        answer = await self.respond(body, stream=False)
        assert isinstance(answer, Completion)
        return answer.body

    async def open_stream(self, body: Any) -> ChatStream:
        """A streamed chat completion, opened up to its first chunk (the handle API)."""
        answer = await self.respond(body, stream=True)
        assert isinstance(answer, ChatStream)
        return answer

    async def text_completion(self, body: Any) -> dict[str, Any]:
        """A whole non-streaming text completion (the handle API)."""
        answer = await self.respond(body, stream=False, kind="text")
        assert isinstance(answer, Completion)
        return answer.body

    async def open_text_stream(self, body: Any) -> ChatStream:
        """A streamed text completion, opened up to its first chunk (the handle API)."""
        answer = await self.respond(body, stream=True, kind="text")
        assert isinstance(answer, ChatStream)
        return answer

    async def _open(self, prepared: Prepared, ticket: _Ticket, deadline: _Deadline) -> ChatStream:
        chunks = self.stream_chunks(prepared)
        try:
            first = await deadline.run(anext(chunks))
        except BaseException:
            # Whatever stopped it has already ended the generator; closing makes sure.
            await chunks.aclose()
            raise
        return ChatStream(prepared, first, chunks, ticket, deadline)
