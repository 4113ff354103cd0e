"""Fakes for unit tests; each implements the same interface as the real thing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import numpy as np

from actors.engines.base import Cancellation, GenerationRequest, GenerationResult, StreamChunk
from router.decision import RouteDecision


class KeywordEmbedder:
    """An `Embedder` whose dimensions are keyword hits: deterministic and readable."""

    def __init__(self, keywords: list[str]) -> None:
        self.keywords = keywords
        self.dimension = len(keywords) + 1

    def embed(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            lowered = text.lower()
            hits = [float(lowered.count(k)) for k in self.keywords]
            row = np.array([*hits, 0.2], dtype=np.float32)  # bias keeps norms non-zero
            rows.append(row / np.linalg.norm(row))
        return np.stack(rows) if rows else np.zeros((0, self.dimension), dtype=np.float32)


class FakeBackend:
    """A `Backend` that routes by keyword and echoes; records every call.

    Options make it misbehave the ways real experts do: `refuse` is raised before any
    output (an overloaded queue), `hang_generate` and `hang_stream_after` wait until
    cancelled (a slow expert), `fail_stream` dies after the first words. It records
    what a caller must clean up: `cancelled` generate calls and `closed_streams`,
    the streams that were closed or cancelled before they finished.
    """

    def __init__(
        self,
        experts: list[str],
        fail_stream: bool = False,
        *,
        refuse: Exception | None = None,
        hang_generate: bool = False,
        hang_stream_after: int | None = None,
    ) -> None:
        self.expert_names = experts
        self.calls: list[tuple[str, str]] = []
        self.fail_stream = fail_stream
        self.refuse = refuse
        self.hang_generate = hang_generate
        self.hang_stream_after = hang_stream_after
        self.cancelled: list[str] = []
        self.closed_streams: list[str] = []
        self.requests: list[GenerationRequest] = []  # what reached an expert, in order

    async def route(self, prompt: str) -> RouteDecision:
        self.calls.append(("route", prompt))
        expert = "math" if "sum" in prompt else "general"
        return RouteDecision(expert, expert, 0.9, False, {expert: 0.9})

    async def generate(self, expert: str, request: GenerationRequest) -> GenerationResult:
        self.calls.append(("generate", expert))
        self.requests.append(request)
        if self.refuse is not None:
            raise self.refuse
        if self.hang_generate:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(expert)
                raise
        said = request.prompt if request.prompt is not None else request.messages[-1].content
        text = f"{expert} says: {said}"
        return GenerationResult(text, prompt_tokens=3, completion_tokens=4, finish_reason="stop")

    async def stream(self, expert: str, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        self.calls.append(("stream", expert))
        self.requests.append(request)
        if self.refuse is not None:
            raise self.refuse
        finished = False
        try:
            for index, word in enumerate(("hello", " world")):
                if index == self.hang_stream_after:
                    await asyncio.Event().wait()
                yield StreamChunk(word, None, prompt_tokens=3, completion_tokens=index + 1)
            if self.fail_stream:
                raise RuntimeError("replica died")
            if self.hang_stream_after is not None and self.hang_stream_after >= 2:
                await asyncio.Event().wait()
            finished = True
            yield StreamChunk("", finish_reason="length", prompt_tokens=3, completion_tokens=2)
        finally:
            if not finished:
                self.closed_streams.append(expert)


class EchoEngine:
    """An `Engine` that answers with the conversation it was given."""

    name = "echo"

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    def generate(
        self, request: GenerationRequest, cancellation: Cancellation | None = None
    ) -> GenerationResult:
        self.requests.append(request)
        text = " | ".join(f"{m.role}:{m.content}" for m in request.messages)
        return GenerationResult(text, prompt_tokens=1, completion_tokens=1, finish_reason="stop")

    def stream(
        self, request: GenerationRequest, cancellation: Cancellation | None = None
    ) -> Iterator[StreamChunk]:
        result = self.generate(request)
        yield StreamChunk(result.text)
        yield StreamChunk("", finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    def close(self) -> None:
        self.requests.clear()
