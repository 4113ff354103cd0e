"""The replica's side of the placement protocol: unfinished jobs end at a grant's
deadline; residency reports stop once the service judged them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from actors.engines.base import BatchJob, ChatMessage, GenerationRequest, StreamChunk
from cluster.serve.placement_client import end_jobs_at_expiry
from memory_tiers.arena import Region
from memory_tiers.errors import GrantExpired
from memory_tiers.grants import Grant
from memory_tiers.hbm import Lease
from memory_tiers.placement import ResidencyReport


def _grant(expires_at: float | None) -> Grant:
    lease = Lease(
        lease_id=7, expert="a", device="host0", region=Region(0, 64), generation=1, needs_copy=False
    )
    return Grant(lease=lease, slot=1, incarnation="i", slot_wait_s=0.0, expires_at=expires_at)


def _job(received: list[StreamChunk | BaseException]) -> BatchJob:
    request = GenerationRequest(messages=(ChatMessage(role="user", content="hi"),), max_tokens=4)

    def emit(item: StreamChunk | BaseException) -> None:
        if isinstance(item, BaseException) or item.finish_reason is not None:
            job.ended = True
        received.append(item)

    job = BatchJob(request, emit)
    return job


def test_unfinished_jobs_end_with_grant_expired_at_the_deadline() -> None:
    running: list[StreamChunk | BaseException] = []
    finished: list[StreamChunk | BaseException] = []
    jobs = [_job(running), _job(finished)]
    jobs[1].emit(StreamChunk(text="done", finish_reason="stop"))

    async def scenario() -> None:
        timer = end_jobs_at_expiry(_grant(time.time() + 0.05), jobs, "a")
        assert timer is not None
        await asyncio.sleep(0.2)

    asyncio.run(scenario())
    assert jobs[0].cancellation.cancelled and jobs[0].ended
    assert len(running) == 1 and isinstance(running[0], GrantExpired)
    assert "lease 7" in str(running[0])
    assert not jobs[1].cancellation.cancelled and len(finished) == 1


def test_a_batch_that_ends_in_time_or_a_grant_without_deadline_is_left_alone() -> None:
    received: list[StreamChunk | BaseException] = []
    jobs = [_job(received)]

    async def scenario() -> None:
        assert end_jobs_at_expiry(_grant(None), jobs, "a") is None
        timer = end_jobs_at_expiry(_grant(time.time() + 0.05), jobs, "a")
        assert timer is not None
        timer.cancel()  # the batch ended before its deadline
        await asyncio.sleep(0.2)

    asyncio.run(scenario())
    assert received == [] and not jobs[0].cancellation.cancelled


class _Method:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[Any, ...]] = []

    async def remote(self, *args: Any) -> Any:
        self.calls.append(args)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class _Handle:
    def __init__(self, answers: list[Any]) -> None:
        self.report = _Method(answers)


def test_a_replica_stops_reporting_a_binding_once_the_service_judged_it() -> None:
    from cluster.serve.placement_client import PlacementClient

    handle = _Handle(["current", "current", RuntimeError("restarting"), "accepted", "refused"])
    client = PlacementClient(handle, holder=("replica-1", None))  # type: ignore[arg-type]
    ours = ResidencyReport("a", "host0", 0, 64, 3)
    older = ResidencyReport("b", "host0", 64, 64, 1)

    async def scenario() -> None:
        # Bound to the running incarnation: reported every time (a later restart needs it).
        await client.report(ours, "now")
        await client.report(ours, "now")
        # An earlier incarnation's binding: reported until judged (a failed call does
        # not count), then never again.
        await client.report(older, "before")
        await client.report(older, "before")
        for _ in range(3):
            await client.report(older, "before")
        # The same expert bound again later (another generation) is a new binding.
        await client.report(ResidencyReport("b", "host0", 64, 64, 2), "before")

    asyncio.run(scenario())
    assert [call[1] for call in handle.report.calls] == ["now", "now", "before", "before", "before"]
    assert handle.report.answers == []
