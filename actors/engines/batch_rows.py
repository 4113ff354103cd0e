"""One batched `generate` call seen row by row: streamer and stopping criteria in one.

transformers hands a streamer every step's new tokens for the whole batch and asks the
stopping criteria which rows are finished. `BatchRows` is both, so a row stops exactly
when its own request is done (its token budget, its stop strings, its cancellation or
an end-of-sequence token) while the other rows decode on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from actors.engines.base import BatchJob, FinishReason, GenerationRequest, StreamChunk
from actors.engines.stop_matching import IncrementalText
from actors.engines.text import StopTrimmer


class _Row:
    """One request's tokens and the text already handed out, decoded incrementally."""

    def __init__(
        self, job: BatchJob, stops: tuple[str, ...], prompt_tokens: int, tokenizer: Any
    ) -> None:
        self.job = job
        self.trimmer = StopTrimmer(stops)
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []
        self.text = IncrementalText(tokenizer)
        self.held = ""  # a non-streamed answer's text, sent whole at the end
        self.done = False
        self.ended_by_eos = False

    @property
    def finish_reason(self) -> FinishReason:
        limit = self.job.request.max_tokens
        stopped = self.ended_by_eos or self.trimmer.stopped
        return "stop" if stopped or len(self.tokens) < limit else "length"


class BatchRows(StoppingCriteria, BaseStreamer):
    """Per-row streaming and stopping for one batched generation."""

    def __init__(
        self,
        tokenizer: Any,
        rows: Sequence[tuple[BatchJob, tuple[str, ...], int]],
        eos_ids: frozenset[int],
        answer_text: Callable[[str, GenerationRequest], str] | None = None,
    ) -> None:
        """`answer_text` tidies a non-streamed answer once it is whole (the engine's
        rule for the answers it generates alone)."""
        self.tokenizer = tokenizer
        self.answer_text = answer_text or (lambda text, _request: text)
        self.rows = [_Row(job, stops, prompt, tokenizer) for job, stops, prompt in rows]
        self.eos_ids = eos_ids
        self._prompt_seen = False

    # -- streamer -----------------------------------------------------------------

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt itself
            self._prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            if not row.done:
                self._advance(row, int(token))

    def end(self) -> None:
        """Called by generate when it stops; `finish` sends the last chunks."""

    def _advance(self, row: _Row, token: int) -> None:
        row.tokens.append(token)
        if token in self.eos_ids:
            row.ended_by_eos = True
            row.done = True
            return
        text = row.trimmer.feed(row.text.push(token))
        if not row.job.stream:
            row.held += text
        elif text:
            row.job.emit(StreamChunk(text, None, row.prompt_tokens, len(row.tokens)))
        if (
            row.trimmer.stopped
            or len(row.tokens) >= row.job.request.max_tokens
            or row.job.cancellation.cancelled
        ):
            row.done = True

    # -- stopping criteria --------------------------------------------------------

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        finished = [row.done or row.job.cancellation.cancelled for row in self.rows]
        return torch.tensor(finished, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    # -- after generation ---------------------------------------------------------

    def finish(self) -> None:
        """Send every row its last chunk: held-back text (a non-streamed answer's whole
        text), finish reason and counts."""
        for row in self.rows:
            tail = row.trimmer.flush()
            if not row.job.stream:
                tail = self.answer_text(row.held + tail, row.job.request)
            row.job.emit(
                StreamChunk(
                    text=tail,
                    finish_reason=row.finish_reason,
                    prompt_tokens=row.prompt_tokens,
                    completion_tokens=len(row.tokens),
                )
            )
