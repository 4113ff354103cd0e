"""Per-expert request batching: requests that queue for one expert decode together.

Decoding a small model is bound by reading its weights, once per token; a batch reads
them once for every row, so a replica under load answers several requests for about
the price of one. `RequestBatcher` is the asyncio side: while one batch runs, new
requests wait; when it ends, the waiting ones with the same batch key run as the next
batch (at most `max_batch_size`, oldest first). Under light load every batch is one
request and nothing waits for a batch to fill.

Plain asyncio, no Ray: `cluster/serve/expert_replica.py` gives it a runner that takes the
expert's device lease and calls the engine on a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from actors.engines.base import (
    BatchJob,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
    batch_key,
)

BatchRunner = Callable[[Sequence[BatchJob]], Awaitable[None]]


class BatchError(RuntimeError):
    """A batch ended without giving this request its last chunk."""


class RequestBatcher:
    """Queues an expert's requests and runs them in batches, one batch at a time."""

    def __init__(self, run: BatchRunner, max_batch_size: int) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._run = run
        self.max_batch_size = max_batch_size
        self._waiting: list[BatchJob] = []
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0
        self.batched_requests = 0
        self.largest_batch = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        text: list[str] = []
        async for chunk in self._submit(request, stream=False):
            text.append(chunk.text)
            if chunk.finish_reason is not None:
                return GenerationResult(
                    text="".join(text),
                    prompt_tokens=chunk.prompt_tokens,
                    completion_tokens=chunk.completion_tokens,
                    finish_reason=chunk.finish_reason,
                )
        raise BatchError("the stream ended without a finish reason")

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        return self._submit(request, stream=True)

    async def _submit(self, request: GenerationRequest, stream: bool) -> AsyncIterator[StreamChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()

        def emit(item: StreamChunk | BaseException) -> None:
            if isinstance(item, BaseException) or item.finish_reason is not None:
                job.ended = True
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # our event loop is closed: nobody is listening
                job.cancellation.cancel()

        job = BatchJob(request, emit, stream=stream)
        self._waiting.append(job)
        self._ensure_worker()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                # The consumer went away: a waiting job is dropped, a running row
                # stops at its next token.
                job.cancellation.cancel()
                if job in self._waiting:
                    self._waiting.remove(job)

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())

    def next_batch(self) -> list[BatchJob]:
        """Take the oldest waiting job and the next waiting ones that share its key."""
        self._waiting = [job for job in self._waiting if not job.cancellation.cancelled]
        if not self._waiting:
            return []
        first = self._waiting[0]
        key = batch_key(first.request)
        batch = [first]
        if key is not None:
            for job in self._waiting[1:]:
                if len(batch) == self.max_batch_size:
                    break
                if batch_key(job.request) == key:
                    batch.append(job)
        self._waiting = [job for job in self._waiting if job not in batch]
        return batch

    async def _work(self) -> None:
        while batch := self.next_batch():
            self.batches += 1
            self.batched_requests += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                await self._run(batch)
            except BaseException as error:
                for job in batch:
                    if not job.ended:
                        job.emit(error)
                if isinstance(error, asyncio.CancelledError):
                    raise
            for job in batch:
                if not job.ended and not job.cancellation.cancelled:
                    job.emit(BatchError("the batch ended without finishing this request"))
