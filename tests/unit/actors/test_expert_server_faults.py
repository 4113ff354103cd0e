"""ExpertServer.run_batch: a failing request ends alone, and a non-streamed job carries
its cancellation into the engine."""

from __future__ import annotations

from collections.abc import Iterator

from actors.engines.base import (
    BatchJob,
    Cancellation,
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
)
from actors.expert_server import ExpertServer
from tests.unit.fakes import EchoEngine


class PickyEngine(EchoEngine):
    """Refuses any conversation that mentions "bad"; records each cancellation it got."""

    def __init__(self) -> None:
        super().__init__()
        self.cancellations: list[Cancellation | None] = []

    def generate(
        self, request: GenerationRequest, cancellation: Cancellation | None = None
    ) -> GenerationResult:
        self.cancellations.append(cancellation)
        if any("bad" in m.content for m in request.messages):
            raise TypeError("cannot encode this text")
        return super().generate(request, cancellation)

    def stream(
        self, request: GenerationRequest, cancellation: Cancellation | None = None
    ) -> Iterator[StreamChunk]:
        result = self.generate(request, cancellation)
        yield StreamChunk(result.text)
        yield StreamChunk("", finish_reason="stop", prompt_tokens=1, completion_tokens=1)


def job(text: str, sink: list[StreamChunk | BaseException], stream: bool) -> BatchJob:
    request = GenerationRequest((ChatMessage("user", text),), max_tokens=4)
    return BatchJob(request, sink.append, stream=stream)


def test_a_failing_request_fails_alone_and_the_rest_are_answered() -> None:
    server = ExpertServer("e", PickyEngine())
    sinks: list[list[StreamChunk | BaseException]] = [[], [], []]
    jobs = [
        job("good one", sinks[0], False),
        job("bad", sinks[1], True),
        job("fine", sinks[2], True),
    ]
    server.run_batch(jobs)
    first, bad, last = sinks
    assert [c.text for c in first if isinstance(c, StreamChunk)] == ["user:good one"]
    assert isinstance(bad[-1], TypeError) and len(bad) == 1
    assert "".join(c.text for c in last if isinstance(c, StreamChunk)) == "user:fine"
    assert isinstance(last[-1], StreamChunk) and last[-1].finish_reason == "stop"


def test_a_non_streamed_job_hands_its_cancellation_to_generate() -> None:
    engine = PickyEngine()
    server = ExpertServer("e", engine)
    sink: list[StreamChunk | BaseException] = []
    whole = job("hello", sink, stream=False)
    server.run_batch([whole])
    assert engine.cancellations == [whole.cancellation]
    assert isinstance(sink[-1], StreamChunk) and sink[-1].finish_reason == "stop"
