"""The OpenAI-compatible HTTP API over a `CoEService`.

Errors are turned into OpenAI-style JSON here and only here: typed `CoEError`s
keep their status, FastAPI's own validation errors become 400s.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.errors import CoEError, InvalidRequest, describe_validation_errors
from cluster.openai_api import ChatCompletionRequest, RouteRequest
from cluster.service import CoEService


def _error(status: int, message: str, error_type: str, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"request body is not valid JSON: {error}") from None


def _schema(model: type[Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def build_http_app(service: CoEService) -> FastAPI:
    app = FastAPI(
        title="CoE cluster",
        description="A Composition of Experts behind one OpenAI-compatible endpoint.",
        version="0.1.0",
    )

    @app.exception_handler(CoEError)
    async def _coe_error(_: Request, error: CoEError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        message, _param = describe_validation_errors(list(error.errors()))
        return _error(400, message, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if error.status_code < 500 else "server_error"
        return _error(error.status_code, str(error.detail), error_type)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return service.models()

    @app.post("/v1/route", openapi_extra=_schema(RouteRequest))
    async def route(request: Request) -> dict[str, Any]:
        return await service.route(await _json_body(request))

    @app.post(
        "/v1/chat/completions", openapi_extra=_schema(ChatCompletionRequest), response_model=None
    )
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        prepared = await service.prepare(await _json_body(request))
        if prepared.request.stream:
            return StreamingResponse(
                service.sse_events(prepared),
                media_type="text/event-stream",
                headers={**prepared.headers, "cache-control": "no-cache"},
            )
        body = await service.complete(prepared)
        return JSONResponse(body, headers=prepared.headers)

    return app
