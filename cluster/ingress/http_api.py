"""The OpenAI-compatible HTTP API over a `CoEService`.

Errors are turned into OpenAI-style JSON here and only here: typed `CoEError`s
keep their status (and headers such as `Retry-After`), FastAPI's own validation
errors become 400s, anything unexpected a 500 that says nothing of its cause.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.ingress.api_errors import (
    CoEError,
    ExpertFailed,
    InternalError,
    Unauthorized,
    describe_validation_errors,
)
from cluster.ingress.auth import UNAUTHORIZED_MESSAGE, ApiKeyGate
from cluster.ingress.openai_api import ChatCompletionRequest, CompletionRequest, RouteRequest
from cluster.ingress.service import ChatStream, CoEService, Completion, sse

# Paths a load balancer may probe without a key; everything else (the API, /docs,
# /openapi.json) needs it when one is set. /health is vLLM's name for the same probe,
# which its clients (guidellm among them) call before they start.
OPEN_PATHS = frozenset({"/healthz", "/health"})
# Closing an abandoned stream only cancels work; it never waits on a slow expert.
CLOSE_TIMEOUT_S = 5.0


def _error(status: int, message: str, error_type: str, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def _coe_response(error: CoEError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers())


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, but never more than `limit` + 1 bytes of it: a larger body
    is refused by its size, and nobody should buffer gigabytes to learn that."""
    received = bytearray()
    async for piece in request.stream():
        received += piece
        if len(received) > limit:
            break
    return bytes(received)


def _schema(model: type[Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _route_path(scope: Scope) -> str:
    """The path inside the app: Serve mounts it under its route prefix (`root_path`)."""
    path: str = scope.get("path", "") or "/"
    root: str = scope.get("root_path", "") or ""
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


class ApiKeyMiddleware:
    """Refuses every request without the key (401, one body for every reason).

    A plain ASGI middleware rather than `@app.middleware("http")`: it adds no task
    or buffering around streamed responses, so a disconnect cancels them directly.
    """

    def __init__(self, app: ASGIApp, gate: ApiKeyGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.gate.open:
            await self.app(scope, receive, send)
            return
        if _route_path(scope) in OPEN_PATHS and scope["type"] == "http":
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                authorization = value.decode("latin-1")
                break
        if self.gate.admits(authorization):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _coe_response(Unauthorized(UNAUTHORIZED_MESSAGE))(scope, receive, send)


async def sse_events(stream: ChatStream) -> AsyncGenerator[str, None]:
    """Server-sent events; a failure after the headers went out becomes an error event."""
    try:
        async for chunk in stream:
            yield sse(chunk)
    except CoEError as error:
        yield sse(error.body())
    except Exception as error:
        failure = ExpertFailed(
            f"expert {stream.prepared.decision.expert!r} failed: {type(error).__name__}"
        )
        yield sse(failure.body())
    finally:
        await stream.aclose()
    yield sse("[DONE]")


class EventStreamResponse(StreamingResponse):
    """A streamed response that closes its events however the response ends.

    A client that goes away cancels the send while the event generator sits at a
    `yield`; nothing would close it (and the expert's stream under it) until the
    garbage collector did. Closing it here frees the expert's slot at once.
    """

    def __init__(self, events: AsyncGenerator[str, None], headers: dict[str, str]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
                await self._events.aclose()


def _answer(answer: Completion | ChatStream) -> JSONResponse | StreamingResponse:
    if isinstance(answer, ChatStream):
        return EventStreamResponse(sse_events(answer), answer.headers)
    return JSONResponse(answer.body, headers=answer.headers)


def build_http_app(service: CoEService, gate: ApiKeyGate | None = None) -> FastAPI:
    app = FastAPI(
        title="CoE cluster",
        description="A Composition of Experts behind one OpenAI-compatible endpoint.",
        version="0.1.0",
    )
    app.add_middleware(ApiKeyMiddleware, gate=gate or ApiKeyGate(None))

    @app.exception_handler(CoEError)
    async def _coe_error(_: Request, error: CoEError) -> JSONResponse:
        return _coe_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        message, _param = describe_validation_errors(list(error.errors()))
        return _error(400, message, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if error.status_code < 500 else "server_error"
        return _error(error.status_code, str(error.detail), error_type)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, __: Exception) -> JSONResponse:
        # Starlette still re-raises it to the server's log; the client learns nothing.
        return _coe_response(InternalError("internal server error"))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return service.models()

    @app.post("/v1/route", openapi_extra=_schema(RouteRequest))
    async def route(request: Request) -> dict[str, Any]:
        return await service.route(await _read_body(request, service.max_body_bytes))

    @app.post(
        "/v1/chat/completions", openapi_extra=_schema(ChatCompletionRequest), response_model=None
    )
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        return _answer(await service.respond(await _read_body(request, service.max_body_bytes)))

    @app.post("/v1/completions", openapi_extra=_schema(CompletionRequest), response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await _read_body(request, service.max_body_bytes)
        return _answer(await service.respond(body, kind="text"))

    def openapi() -> dict[str, Any]:
        # Request bodies are declared by hand (their models' `$defs` inside each body);
        # publish those definitions as components, where the `$ref`s point.
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                servers=app.servers,
            )
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for path in document["paths"].values():
                for operation in path.values():
                    for media in operation.get("requestBody", {}).get("content", {}).values():
                        components.update(media["schema"].pop("$defs", {}))
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
