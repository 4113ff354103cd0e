"""OpenAI-compatible response bodies: chat and text completions, whole and streamed.

Both kinds carry the routing decision in a `coe` object and the `x-coe-*` headers.
A streamed completion is a run of chunks, one per piece of text, then one with the
finish reason, then (when asked) one with the usage and no choices, as OpenAI sends.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from actors.engines.base import GenerationResult
from router.decision import RouteDecision


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


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
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


@dataclass(frozen=True)
class Shape:
    """How one kind of completion looks on the wire."""

    kind: Literal["chat", "text"]

    @property
    def chat(self) -> bool:
        return self.kind == "chat"

    def new_id(self) -> str:
        prefix = "chatcmpl" if self.chat else "cmpl"
        return f"{prefix}-{uuid.uuid4().hex[:24]}"

    def _head(self, completion_id: str, decision: RouteDecision, streamed: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if streamed else "chat.completion"
        else:
            kind = "text_completion"
        return {
            "id": completion_id,
            "object": kind,
            "created": int(time.time()),
            "model": decision.expert,
        }

    def whole(
        self, result: GenerationResult, decision: RouteDecision, requested_model: str
    ) -> dict[str, Any]:
        """A non-streamed completion."""
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice.update(text=result.text, logprobs=None)
        choice["finish_reason"] = result.finish_reason
        return {
            **self._head(self.new_id(), decision, streamed=False),
            "choices": [choice],
            "usage": usage_body(result.prompt_tokens, result.completion_tokens),
            "coe": routing_metadata(decision, requested_model),
        }

    def opening(
        self, completion_id: str, decision: RouteDecision, requested_model: str
    ) -> dict[str, Any] | None:
        """The chunk a chat stream starts with (the assistant's role); text has none."""
        if not self.chat:
            return None
        return self.piece(
            completion_id, decision, requested_model, {"role": "assistant", "content": ""}
        )

    def text_piece(
        self,
        completion_id: str,
        decision: RouteDecision,
        requested_model: str,
        text: str,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        """A chunk with a piece of the answer (empty with the finish reason)."""
        delta: dict[str, str] = {"content": text} if self.chat and text else {}
        if not self.chat:
            return self._choice_chunk(
                completion_id,
                decision,
                requested_model,
                {"text": text, "logprobs": None, "finish_reason": finish_reason},
            )
        return self.piece(completion_id, decision, requested_model, delta, finish_reason)

    def piece(
        self,
        completion_id: str,
        decision: RouteDecision,
        requested_model: str,
        delta: dict[str, str],
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        """A chat chunk with this delta."""
        return self._choice_chunk(
            completion_id,
            decision,
            requested_model,
            {"delta": delta, "finish_reason": finish_reason},
        )

    def _choice_chunk(
        self,
        completion_id: str,
        decision: RouteDecision,
        requested_model: str,
        choice: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            **self._head(completion_id, decision, streamed=True),
            "choices": [{"index": 0, **choice}],
            "coe": routing_metadata(decision, requested_model),
        }

    def usage_chunk(
        self,
        completion_id: str,
        decision: RouteDecision,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> dict[str, Any]:
        """The last chunk when the client asked for usage: no choices, the usage."""
        return {
            **self._head(completion_id, decision, streamed=True),
            "choices": [],
            "usage": usage_body(prompt_tokens, completion_tokens),
        }


CHAT = Shape("chat")
TEXT = Shape("text")
