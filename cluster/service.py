"""The ingress's logic without Ray: validate, route, dispatch, shape OpenAI responses.

`CoEService` talks to the router and the experts through a `Backend`; the Serve
ingress supplies one made of deployment handles, unit tests a fake one. Both the
HTTP API and Python handle callers go through the same methods, so they get the
same validation, the same errors and the same bodies.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from actors.engine import GenerationRequest, GenerationResult, StreamChunk
from cluster.config import ROUTED_MODEL, ServeSettings
from cluster.errors import CoEError, ExpertFailed, ModelNotFound
from cluster.openai_api import (
    ChatCompletionRequest,
    RouteRequest,
    chunk_body,
    completion_body,
    models_body,
    new_completion_id,
    parse_request,
    routing_headers,
    to_generation_request,
    usage_chunk,
)
from router.two_step import RouteDecision


class Backend(Protocol):
    """How the service reaches the router and the experts."""

    expert_names: list[str]

    async def route(self, prompt: str) -> RouteDecision: ...

    async def generate(self, expert: str, request: GenerationRequest) -> GenerationResult: ...

    def stream(self, expert: str, request: GenerationRequest) -> AsyncIterator[StreamChunk]: ...


@dataclass(frozen=True)
class Prepared:
    """A validated chat request with its routing decision, ready to dispatch."""

    request: ChatCompletionRequest
    generation: GenerationRequest
    decision: RouteDecision

    @property
    def headers(self) -> dict[str, str]:
        return routing_headers(self.decision)


def direct_decision(expert: str) -> RouteDecision:
    """A request that names its expert skips the router; say so in the metadata."""
    return RouteDecision(
        expert=expert, category="direct", confidence=1.0, fallback=False, scores={}
    )


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


class CoEService:
    def __init__(self, limits: ServeSettings, backend: Backend) -> None:
        self.limits = limits
        self.backend = backend

    def models(self) -> dict[str, Any]:
        return models_body(list(self.backend.expert_names))

    async def route(self, body: Any) -> dict[str, Any]:
        request: RouteRequest = parse_request(RouteRequest, body)
        decision = await self.backend.route(request.routing_text())
        return decision.to_dict()

    async def prepare(self, body: Any) -> Prepared:
        """Validate and route; raises a typed 4xx error before any expert is touched."""
        request: ChatCompletionRequest = parse_request(ChatCompletionRequest, body)
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
        return Prepared(request, generation, decision)

    async def complete(self, prepared: Prepared) -> dict[str, Any]:
        try:
            result = await self.backend.generate(prepared.decision.expert, prepared.generation)
        except CoEError:
            raise
        except Exception as error:
            raise ExpertFailed(
                f"expert {prepared.decision.expert!r} failed: {type(error).__name__}"
            ) from error
        return completion_body(result, prepared.decision, prepared.request.model)

    async def chat(self, body: Any) -> dict[str, Any]:
        """A whole non-streaming chat completion (the handle API)."""
        return await self.complete(await self.prepare(body))

    async def stream_chunks(self, prepared: Prepared) -> AsyncIterator[dict[str, Any]]:
        """OpenAI chunk objects for a streamed completion."""
        completion_id = new_completion_id()
        decision, model = prepared.decision, prepared.request.model
        yield chunk_body(completion_id, decision, model, {"role": "assistant", "content": ""})
        final: StreamChunk | None = None
        async for chunk in self.backend.stream(decision.expert, prepared.generation):
            if chunk.text:
                yield chunk_body(completion_id, decision, model, {"content": chunk.text})
            if chunk.finish_reason is not None:
                final = chunk
        if final is None:
            raise ExpertFailed(f"expert {decision.expert!r} ended the stream without finishing")
        yield chunk_body(completion_id, decision, model, {}, final.finish_reason)
        options = prepared.request.stream_options
        if options is not None and options.include_usage:
            yield usage_chunk(completion_id, decision, final.prompt_tokens, final.completion_tokens)

    async def sse_events(self, prepared: Prepared) -> AsyncIterator[str]:
        """Server-sent events; a failure after the headers went out becomes an error event."""
        try:
            async for chunk in self.stream_chunks(prepared):
                yield sse(chunk)
        except CoEError as error:
            yield sse(error.body())
        except Exception as error:
            failure = ExpertFailed(
                f"expert {prepared.decision.expert!r} failed: {type(error).__name__}"
            )
            yield sse(failure.body())
        yield sse("[DONE]")
