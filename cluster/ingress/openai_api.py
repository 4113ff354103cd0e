"""OpenAI-compatible request and response shapes for the HTTP API and handle calls."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.engines.base import ChatMessage, GenerationRequest, GenerationResult
from cluster.config import ServeSettings
from cluster.ingress.api_errors import InvalidRequest, PromptTooLong, describe_validation_errors
from router.decision import RouteDecision

# OpenAI's own bound on stop sequences.
MAX_STOPS = 4


class _Request(BaseModel):
    # strict: "5" is not a number and "hi" is not a list; unknown fields are errors.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class MessageIn(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    """The subset of OpenAI's chat completion request this cluster honours."""

    model: str = Field(min_length=1, description="'coe' to route, or an expert's name.")
    messages: list[MessageIn] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or unset: greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    seed: int | None = Field(
        None,
        ge=-(2**63),
        le=2**63 - 1,
        description="Sampling seed, a 64-bit signed integer (as in the gRPC API).",
    )
    n: Literal[1] | None = Field(None, description="Only one choice is supported.")
    stream: bool = Field(False, description="Server-sent events in OpenAI's chunk format.")
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise ValueError("messages must contain a non-empty user message")
        stops = self.stop_list()
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(
                f"stop takes at most {MAX_STOPS} non-empty strings, got {len(stops)} "
                f"({sum(1 for s in stops if not s)} empty)"
            )
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def routing_text(self) -> str:
        """The text the router classifies: the latest user turn."""
        return next(m.text() for m in reversed(self.messages) if m.role == "user")


class RouteRequest(_Request):
    """Body of POST /v1/route: a prompt, or messages whose last user turn is routed."""

    prompt: str | None = Field(None, min_length=1)
    messages: list[MessageIn] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> RouteRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not any(m.role == "user" for m in self.messages):
            raise ValueError("messages must contain a user message")
        return self

    def routing_text(self) -> str:
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None
        return next(m.text() for m in reversed(self.messages) if m.role == "user")


def parse_request(model: type[_Request], body: Any) -> Any:
    """Validate a handle caller's dict the way the HTTP layer validates JSON."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        message, param = describe_validation_errors(error.errors())
        raise InvalidRequest(message, param=param) from None


def to_generation_request(
    request: ChatCompletionRequest, limits: ServeSettings
) -> GenerationRequest:
    """Apply the server's limits and defaults; raise a typed 4xx error when out of bounds."""
    total_chars = sum(len(m.text()) for m in request.messages)
    if total_chars > limits.max_prompt_chars:
        raise PromptTooLong(
            f"the conversation has {total_chars} characters; "
            f"the limit is {limits.max_prompt_chars}",
            param="messages",
        )
    # Name the field the client actually sent, so the message points at its own request.
    field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    max_tokens = request.max_completion_tokens or request.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens_limit:
        raise InvalidRequest(
            f"{field} {max_tokens} exceeds this server's limit of {limits.max_tokens_limit}",
            param=field,
        )
    return GenerationRequest(
        messages=tuple(ChatMessage(role=m.role, content=m.text()) for m in request.messages),
        max_tokens=max_tokens,
        temperature=request.temperature or 0.0,
        top_p=request.top_p or 1.0,
        stop=tuple(request.stop_list()),
        seed=request.seed,
    )


def routing_metadata(decision: RouteDecision, requested_model: str) -> dict[str, Any]:
    return {
        "requested_model": requested_model,
        "routed": requested_model == "coe",
        "expert": decision.expert,
        "category": decision.category,
        "confidence": round(decision.confidence, 6),
        "fallback": decision.fallback,
    }


def routing_headers(decision: RouteDecision) -> dict[str, str]:
    return {
        "x-coe-expert": decision.expert,
        "x-coe-category": decision.category,
        "x-coe-confidence": f"{decision.confidence:.4f}",
        "x-coe-fallback": str(decision.fallback).lower(),
    }


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(
    result: GenerationResult, decision: RouteDecision, requested_model: str
) -> dict[str, Any]:
    return {
        "id": new_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": decision.expert,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
        "coe": routing_metadata(decision, requested_model),
    }


def chunk_body(
    completion_id: str,
    decision: RouteDecision,
    requested_model: str,
    delta: dict[str, str],
    finish_reason: str | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": decision.expert,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        "coe": routing_metadata(decision, requested_model),
    }


def usage_chunk(
    completion_id: str, decision: RouteDecision, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": decision.expert,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def models_body(expert_names: list[str]) -> dict[str, Any]:
    created = int(time.time())
    ids = ["coe", *expert_names]
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "coe"} for name in ids
        ],
    }
