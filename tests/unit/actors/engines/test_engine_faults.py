"""A real tiny engine: a cancelled `generate` returns early, and a row whose prompt cannot
be encoded fails alone while the rest of its batch is answered."""

from __future__ import annotations

import threading
import time

from actors.engines.base import BatchJob, Cancellation, GenerationRequest, StreamChunk
from actors.engines.transformers_engine import TransformersEngine
from actors.expert_server import ExpertServer

MAX_TOKENS = 1500


def test_a_cancelled_generate_stops_at_the_next_token(tiny_engine: TransformersEngine) -> None:
    cancellation = Cancellation()

    def cancel_once_running() -> None:
        deadline = time.monotonic() + 30
        while not tiny_engine._slot.locked() and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.01)  # a few tokens in
        cancellation.cancel()

    canceller = threading.Thread(target=cancel_once_running)
    canceller.start()
    request = GenerationRequest((), MAX_TOKENS, prompt="the quick", ignore_eos=True)
    result = tiny_engine.generate(request, cancellation)
    canceller.join()
    assert result.completion_tokens < MAX_TOKENS // 10
    assert not tiny_engine._slot.locked()


def test_generate_without_cancellation_runs_its_budget(tiny_engine: TransformersEngine) -> None:
    request = GenerationRequest((), 12, prompt="the quick", ignore_eos=True)
    assert tiny_engine.generate(request, Cancellation()).completion_tokens == 12


class Collected:
    """One job's emitted chunks, or the error that ended it."""

    def __init__(self, prompt: str, stream: bool) -> None:
        self.items: list[StreamChunk | BaseException] = []
        request = GenerationRequest((), 6, prompt=prompt, ignore_eos=True)
        self.job = BatchJob(request, self.items.append, stream=stream)

    @property
    def text(self) -> str:
        return "".join(item.text for item in self.items if isinstance(item, StreamChunk))

    @property
    def finish(self) -> str | None:
        last = self.items[-1]
        return last.finish_reason if isinstance(last, StreamChunk) else None


def test_a_row_that_cannot_be_encoded_fails_alone(tiny_engine: TransformersEngine) -> None:
    server = ExpertServer("tiny", tiny_engine)
    # The same two rows batched without the bad one: what each should get.
    pair = [Collected("the quick", stream=False), Collected("hello world", stream=True)]
    server.run_batch([row.job for row in pair])
    rows = [
        Collected("the quick", stream=False),
        Collected("bad \ud800 text", stream=True),
        Collected("hello world", stream=True),
    ]
    server.run_batch([row.job for row in rows])
    good, bad, other = rows
    assert good.text and (good.text, good.finish) == (pair[0].text, "length")
    assert other.text and (other.text, other.finish) == (pair[1].text, "length")
    assert len(bad.items) == 1 and isinstance(bad.items[0], Exception)
    assert not tiny_engine._slot.locked()
