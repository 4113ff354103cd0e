"""An expert: an engine plus its domain instructions and request accounting.

This is the plain class an expert replica runs; `cluster/serve/expert_replica.py`
makes it a Serve deployment and wraps each batch in a tier grant (HBM lease and
active slot) before the engine runs, so nothing here knows about the tiers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from actors.engines.base import (
    BatchJob,
    Cancellation,
    ChatMessage,
    Engine,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
)


def make_engine(
    name: str,
    engine: str,
    checkpoint_dir: Path,
    dtype: str,
    chat_format: str,
    model: Any | None = None,
    tokenizer: Any | None = None,
) -> Engine:
    """Build the configured engine; imports stay lazy so DeepSpeed loads only when used.

    `model`, when given, is served instead of loading the checkpoint's weights;
    `tokenizer`, when given, instead of loading the checkpoint's tokenizer.
    """
    options: dict[str, Any] = {
        "dtype": dtype,
        "chat_format": chat_format,
        "model": model,
        "tokenizer": tokenizer,
    }
    if engine == "deepspeed":
        from actors.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(name, checkpoint_dir, **options)
    if engine == "transformers":
        from actors.engines.transformers_engine import TransformersEngine

        return TransformersEngine(name, checkpoint_dir, **options)
    raise ValueError(f"unknown engine {engine!r}; expected 'transformers' or 'deepspeed'")


class ExpertServer:
    """Answers conversations as one expert."""

    def __init__(self, name: str, engine: Engine, system_prompt: str = "") -> None:
        self.name = name
        self.engine = engine
        self.system_prompt = system_prompt
        self.requests = 0

    def warm_up(self) -> None:
        """Run one token through the engine so the first client does not pay for
        lazy initialisation (kernel selection, allocator growth); not counted."""
        probe = GenerationRequest(
            messages=(ChatMessage(role="user", content="Hello"),), max_tokens=1
        )
        self.engine.generate(probe)

    def _with_instructions(self, request: GenerationRequest) -> GenerationRequest:
        """Prepend the expert's system prompt unless the client brought its own; a raw
        prompt (a text completion) is continued as it is, without one."""
        self.requests += 1
        has_system = any(m.role == "system" for m in request.messages)
        if not self.system_prompt or has_system or request.prompt is not None:
            return request
        system = ChatMessage(role="system", content=self.system_prompt)
        return replace(request, messages=(system, *request.messages))

    def generate(
        self, request: GenerationRequest, cancellation: Cancellation | None = None
    ) -> GenerationResult:
        return self.engine.generate(self._with_instructions(request), cancellation)

    def stream(
        self, request: GenerationRequest, cancellation: Cancellation | None = None
    ) -> Iterator[StreamChunk]:
        return self.engine.stream(self._with_instructions(request), cancellation)

    def run_batch(self, jobs: Sequence[BatchJob]) -> None:
        """Answer a batch (blocking; call it on a worker thread). Several jobs decode as
        one batch when the engine can (`stream_batch`), else one after another; there a
        job that fails ends with its own error and the next one still runs."""
        prepared = [replace(job, request=self._with_instructions(job.request)) for job in jobs]
        stream_batch = getattr(self.engine, "stream_batch", None)
        if len(prepared) > 1 and stream_batch is not None:
            stream_batch(prepared)
            return
        for job in prepared:
            try:
                self._run_alone(job)
            except Exception as error:
                job.emit(error)

    def _run_alone(self, job: BatchJob) -> None:
        if not job.stream:
            result = self.engine.generate(job.request, job.cancellation)
            job.emit(
                StreamChunk(
                    text=result.text,
                    finish_reason=result.finish_reason,
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                )
            )
            return
        chunks = self.engine.stream(job.request, job.cancellation)
        try:
            for chunk in chunks:
                job.emit(chunk)
                if job.cancellation.cancelled:
                    break
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # the engine's own cleanup: it joins its generation thread

    def close(self) -> None:
        self.engine.close()
