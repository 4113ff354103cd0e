"""RequestBatcher: which requests share a batch, and how each one's answer gets back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from actors.batching import BatchError, RequestBatcher
from actors.engines.base import BatchJob, ChatMessage, GenerationRequest, StreamChunk, batch_key
from actors.expert_server import ExpertServer
from tests.unit.fakes import EchoEngine


def ask(text: str, **options: object) -> GenerationRequest:
    return GenerationRequest((ChatMessage("user", text),), max_tokens=4, **options)  # type: ignore[arg-type]


class GatedRunner:
    """Answers each job with its prompt; the first batch waits until `release` is set,
    so requests sent meanwhile queue up the way they do behind a running batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()

    async def __call__(self, jobs: Sequence[BatchJob]) -> None:
        self.batches.append([job.request.messages[-1].content for job in jobs])
        if len(self.batches) == 1:
            await self.release.wait()
        for job in jobs:
            job.emit(StreamChunk(job.request.messages[-1].content))
            job.emit(StreamChunk("!", finish_reason="stop", prompt_tokens=2, completion_tokens=1))


async def _send_while_first_runs(
    batcher: RequestBatcher, runner: GatedRunner, requests: list[GenerationRequest]
) -> list[str]:
    first = asyncio.create_task(batcher.generate(ask("first")))
    await asyncio.sleep(0)  # the first batch starts and holds the gate
    rest = [asyncio.create_task(batcher.generate(r)) for r in requests]
    await asyncio.sleep(0)
    runner.release.set()
    answers = await asyncio.gather(first, *rest)
    return [a.text for a in answers]


def test_requests_that_queue_behind_a_batch_run_together_oldest_first() -> None:
    runner = GatedRunner()
    batcher = RequestBatcher(runner, max_batch_size=3)
    requests = [ask(f"q{i}") for i in range(5)]
    answers = asyncio.run(_send_while_first_runs(batcher, runner, requests))
    assert answers == ["first!", "q0!", "q1!", "q2!", "q3!", "q4!"]
    assert runner.batches == [["first"], ["q0", "q1", "q2"], ["q3", "q4"]]
    assert (batcher.batches, batcher.largest_batch, batcher.batched_requests) == (3, 3, 6)


def test_only_requests_with_one_sampling_setting_share_a_batch() -> None:
    runner = GatedRunner()
    batcher = RequestBatcher(runner, max_batch_size=8)
    requests = [
        ask("greedy-a"),
        ask("hot-a", temperature=0.8),
        ask("greedy-b"),
        ask("seeded", temperature=0.8, seed=3),
        ask("hot-b", temperature=0.8),
    ]
    asyncio.run(_send_while_first_runs(batcher, runner, requests))
    assert runner.batches == [
        ["first"],
        ["greedy-a", "greedy-b"],
        ["hot-a", "hot-b"],
        ["seeded"],
    ]


def test_batch_key_separates_sampling_settings_and_isolates_seeds() -> None:
    assert batch_key(ask("a")) == batch_key(ask("b", seed=5))  # greedy ignores the seed
    assert batch_key(ask("a", temperature=0.7)) != batch_key(ask("a", temperature=0.9))
    assert batch_key(ask("a", temperature=0.7, top_p=0.5)) != batch_key(ask("a", temperature=0.7))
    assert batch_key(ask("a", temperature=0.7, seed=1)) is None


def test_batch_size_one_turns_batching_off_and_zero_is_refused() -> None:
    runner = GatedRunner()
    batcher = RequestBatcher(runner, max_batch_size=1)
    asyncio.run(_send_while_first_runs(batcher, runner, [ask("a"), ask("b")]))
    assert runner.batches == [["first"], ["a"], ["b"]]
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        RequestBatcher(runner, max_batch_size=0)


def test_a_request_abandoned_while_waiting_never_runs() -> None:
    async def scenario(runner: GatedRunner, batcher: RequestBatcher) -> str:
        first = asyncio.create_task(batcher.generate(ask("first")))
        await asyncio.sleep(0)
        leaving = asyncio.create_task(batcher.generate(ask("leaving")))
        staying = asyncio.create_task(batcher.generate(ask("staying")))
        await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.sleep(0)
        runner.release.set()
        await first
        return (await staying).text

    runner = GatedRunner()
    batcher = RequestBatcher(runner, max_batch_size=4)
    assert asyncio.run(scenario(runner, batcher)) == "staying!"
    assert runner.batches == [["first"], ["staying"]]
    assert batcher.waiting == 0


def test_streams_get_their_chunks_in_order() -> None:
    async def scenario() -> list[StreamChunk]:
        batcher = RequestBatcher(GatedRunner(), max_batch_size=2)
        batcher_runner = batcher._run
        assert isinstance(batcher_runner, GatedRunner)
        batcher_runner.release.set()
        return [chunk async for chunk in batcher.stream(ask("hello"))]

    chunks = asyncio.run(scenario())
    assert [c.text for c in chunks] == ["hello", "!"]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 1


def test_a_failed_batch_fails_every_request_in_it_and_the_next_batch_still_runs() -> None:
    calls: list[int] = []

    async def flaky(jobs: Sequence[BatchJob]) -> None:
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("device fault")
        for job in jobs:
            job.emit(StreamChunk("ok", finish_reason="stop"))

    async def scenario() -> tuple[list[BaseException | None], str]:
        batcher = RequestBatcher(flaky, max_batch_size=4)
        failed = await asyncio.gather(
            batcher.generate(ask("a")), batcher.generate(ask("b")), return_exceptions=True
        )
        after = await batcher.generate(ask("c"))
        return [f if isinstance(f, BaseException) else None for f in failed], after.text

    failed, after = asyncio.run(scenario())
    assert [str(f) for f in failed] == ["device fault", "device fault"]
    assert after == "ok"


def test_a_runner_that_forgets_a_request_fails_it_instead_of_hanging() -> None:
    async def forgetful(jobs: Sequence[BatchJob]) -> None:
        return None

    async def scenario() -> None:
        await RequestBatcher(forgetful, max_batch_size=2).generate(ask("a"))

    with pytest.raises(BatchError, match="without finishing"):
        asyncio.run(scenario())


def test_expert_server_answers_a_batch_through_an_engine_without_batch_support() -> None:
    engine = EchoEngine()
    server = ExpertServer("e", engine, system_prompt="Be brief.")
    seen: list[list[StreamChunk | BaseException]] = [[], []]
    jobs = [
        BatchJob(ask("one"), seen[0].append, stream=False),
        BatchJob(ask("two"), seen[1].append, stream=True),
    ]
    server.run_batch(jobs)
    # One after another, each with the expert's instructions; the lone non-streamed
    # job is answered in one piece.
    assert [[c.text for c in chunks if isinstance(c, StreamChunk)] for chunks in seen] == [
        ["system:Be brief. | user:one"],
        ["system:Be brief. | user:two", ""],
    ]
    assert all(isinstance(c[-1], StreamChunk) and c[-1].finish_reason for c in seen)
    assert server.requests == 2
