"""The expert replica's side of a grant deadline: unfinished jobs end when it passes."""

from __future__ import annotations

import asyncio
import time

from actors.engines.base import BatchJob, ChatMessage, GenerationRequest, StreamChunk
from cluster.serve.placement_client import end_jobs_at_expiry
from memory_tiers.arena import Region
from memory_tiers.errors import GrantExpired
from memory_tiers.grants import Grant
from memory_tiers.hbm import Lease


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
