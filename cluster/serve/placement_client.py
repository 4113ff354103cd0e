"""What an expert or executor replica calls on the placement service, and how.

Both replica kinds take grants the same way: as a named holder (so the service can take
a grant back from a replica that dies or hangs), riding out a placement restart, and
ending a batch's jobs at the grant's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from actors.engines.base import BatchJob
from actors.weights.tiered_weights import attach_device_arena
from memory_tiers.arena import DeviceArena
from memory_tiers.arena_files import remove_unused
from memory_tiers.device_memory import gpu_uuid
from memory_tiers.errors import GrantExpired, SourceChanged
from memory_tiers.grant_service import SETTLED_VERDICTS
from memory_tiers.grants import Grant
from memory_tiers.placement import ResidencyReport

logger = logging.getLogger("ray.serve")
# How long a replica keeps retrying while the placement service restarts.
PLACEMENT_RETRY_S = 120.0


def end_jobs_at_expiry(
    grant: Grant, jobs: Sequence[BatchJob], expert: str
) -> asyncio.TimerHandle | None:
    """At `grant`'s deadline, end every job of its batch not finished by then.

    The placement service takes the grant back at that moment and may copy another
    expert over its bytes, so nothing computed after it may reach a client: each job
    is cancelled (a stream stops at its next token) and ends with `GrantExpired`.
    Every request of the batch arrived before the grant, so each has already outlived
    the request timeout by then. Returns the timer (cancel it when the batch ends), or
    None for a grant without a deadline.
    """
    if grant.expires_at is None:
        return None

    def expire() -> None:
        error = GrantExpired(
            f"expert {expert!r}: the request outlived its grant (lease "
            f"{grant.lease.lease_id}), which was taken back at the request deadline"
        )
        for job in jobs:
            if not job.ended:
                job.cancellation.cancel()
                job.emit(error)

    delay = max(0.0, grant.expires_at - time.time())
    return asyncio.get_running_loop().call_later(delay, expire)


def attach_arena(described: dict[str, Any]) -> DeviceArena | None:
    """The device arena a placement `describe` names: a GPU's, mapped through CUDA IPC,
    or a host arena file, mapped read-only (only the placement service writes it: a
    replica writing through its views would corrupt every replica sharing the bytes);
    None on a zero-copy device, whose grants carry DDR objects."""
    share = described.get("arena")
    if share is not None:
        return attach_device_arena(share)
    path = described.get("arena_path")
    if path is None:
        return None
    return DeviceArena.attach_file(Path(path), writable=False)


def detach_arena(arena: DeviceArena) -> None:
    """Unmap a replica's view of the arena when Serve stops the replica, and remove the
    file when no other process maps it (the whole application is being deleted)."""
    arena.close()
    if arena.path is not None:
        remove_unused(arena.path)


class PlacementClient:
    """The placement service as one replica sees it: calls retried across its restart."""

    def __init__(self, handle: DeploymentHandle, holder: tuple[str, Any] | None = None) -> None:
        self.handle = handle
        # Who holds this replica's grants: the placement service takes them back if
        # this replica's actor dies (or hangs past a grant's deadline) while holding one.
        self.holder: tuple[str, Any] = holder if holder is not None else _this_actor()
        # Bindings of earlier incarnations the service has judged: never reported again
        # (a binding only serves grants of its own incarnation, so once judged, nothing
        # about it can change; a replica idle for days must not keep asking).
        self.settled: set[tuple[str, str, int, int]] = set()
        # The device this replica takes grants on: its GPU's arena, found by the GPU's
        # uuid on the first describe (None: not asked yet).
        self.device: str | None = None

    async def call(
        self, method: str, *args: Any, also_retry: tuple[type[Exception], ...] = ()
    ) -> Any:
        """Call the placement service, riding out its restart (Serve replaces it) and,
        within the same bound, the errors in `also_retry`."""
        retried: tuple[type[BaseException], ...] = (RayActorError, *also_retry)
        deadline = time.monotonic() + PLACEMENT_RETRY_S
        while True:
            try:
                return await getattr(self.handle, method).remote(*args)
            except retried:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def describe(self, expert: str, source: str) -> dict[str, Any]:
        """What `expert`'s replica binds against, once the service holds the bytes of
        `source`: after a `coe apply` that changed the expert, the new replica may ask
        before the service has repacked it, and waits (bounded) rather than bind the old
        bytes."""
        if self.device is None:
            self.device = str(await self.call("device_for", local_gpu_uuid()))
        described: dict[str, Any] = await self.call(
            "describe", expert, source, self.device, also_retry=(SourceChanged,)
        )
        return described

    async def acquire(self, expert: str, source: str | None = None) -> Grant:
        """A grant for one request on bytes of `source` (`SourceChanged` if the service
        holds another source's: this replica is being replaced)."""
        grant: Grant = await self.call("acquire", expert, *self.holder, source, self.device)
        return grant

    async def give_back(self, grant: Grant) -> None:
        if not await self.call("release", grant):
            # Taken back at its deadline while this replica was slow or stopped; the
            # next grant says whether the bytes moved (then they are rebound).
            logger.warning(
                "expert %s: its grant (lease %d) had been taken back before it ended",
                grant.lease.expert,
                grant.lease.lease_id,
            )

    async def report(self, report: ResidencyReport, incarnation: str) -> None:
        """One residency report, unless the service judged this binding already; a
        restarting service misses it (the next one counts)."""
        key = (incarnation, report.expert, report.generation, report.offset)
        if key in self.settled:
            return
        try:
            verdict = await self.handle.report.remote(report, incarnation)
        except RayActorError:
            return
        except Exception as error:  # keep reporting, but let the failure be seen
            logger.warning("residency report for %s failed: %s", report.expert, error)
            return
        if verdict in SETTLED_VERDICTS:
            self.settled.add(key)


def local_gpu_uuid() -> str | None:
    """The uuid of the GPU Ray gave this replica (it sees that one as index 0), or None
    for a replica without a GPU share."""
    import ray
    import torch

    if not ray.get_gpu_ids() or not torch.cuda.is_available():
        return None
    return gpu_uuid(torch.device("cuda", 0))


def _this_actor() -> tuple[str, Any]:
    import ray

    context = ray.get_runtime_context()
    return (context.get_actor_id() or "", context.current_actor)
