"""The expert replica: one expert LLM served by Serve, optionally on the memory tiers.

Every replica process imports the module that defines its class, so this module
imports only what an expert needs: the engine and its server, the tiered weights,
and the config schema; never the ingress (HTTP, gRPC, the service) nor the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from actors.batching import RequestBatcher
from actors.engines.base import BatchJob, GenerationRequest, GenerationResult, StreamChunk
from actors.expert_server import ExpertServer, make_engine
from actors.weights.tiered_weights import TieredWeights
from cluster.config import ExpertSettings
from memory_tiers.arena import DeviceArena
from memory_tiers.arena_files import remove_unused
from memory_tiers.errors import GrantExpired
from memory_tiers.grant_service import REPORT_INTERVAL_S
from memory_tiers.grants import Grant
from memory_tiers.packing import TensorIndex

logger = logging.getLogger("ray.serve")
# How long an expert replica keeps retrying while the placement service restarts.
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


class ExpertReplica:
    """One expert LLM; its name, engine and autoscaling come from the config.

    With a placement service (memory tiers on), the replica owns no weights of its
    own: it builds a meta-device skeleton, attaches the device's shared arena and,
    for every request, takes a grant (HBM lease + active slot) and rebinds its views
    only when the expert's bytes moved.
    """

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        expert: dict[str, Any],
        checkpoint_dir: str,
        placement: DeploymentHandle | None = None,
    ) -> None:
        settings = ExpertSettings.model_validate(expert)
        self.settings = settings
        self.placement = placement
        self.weights: TieredWeights | None = None
        self._serial = asyncio.Lock()
        self._in_use = False
        model = None
        grant = None
        # Who holds this replica's grants: the placement service takes them back if
        # this replica's actor dies while holding one.
        self._holder: tuple[str, Any] = ("", None)
        if placement is not None:
            import ray

            context = ray.get_runtime_context()
            self._holder = (context.get_actor_id() or "", context.current_actor)
            described = await self._call_placement("describe", settings.name)
            index = TensorIndex.from_json(described["index"])
            # Read-only: only the placement service writes the arena; a replica that
            # wrote through its views would corrupt every replica sharing the bytes.
            arena = DeviceArena.attach_file(Path(described["arena_path"]), writable=False)
            self.weights = await asyncio.to_thread(
                TieredWeights, settings.name, Path(checkpoint_dir), settings.dtype, index, arena
            )
            grant = await self._call_placement("acquire", settings.name, *self._holder)
            self.weights.bind(grant)
            model = self.weights.model
        try:
            engine = await asyncio.to_thread(
                make_engine,
                settings.name,
                settings.engine,
                Path(checkpoint_dir),
                settings.dtype,
                settings.chat_format,
                model,
            )
            self.server = ExpertServer(settings.name, engine, settings.system_prompt)
            self.batcher = RequestBatcher(self._run_batch, settings.max_batch_size)
            await asyncio.to_thread(self.server.warm_up)
        finally:
            if grant is not None:
                await self._give_back(grant)
        if placement is not None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        logger.info("expert %s ready (%s engine)", settings.name, settings.engine)

    async def _call_placement(self, method: str, *args: Any) -> Any:
        """Call the placement service, riding out its restart (Serve replaces it)."""
        assert self.placement is not None
        deadline = time.monotonic() + PLACEMENT_RETRY_S
        while True:
            try:
                return await getattr(self.placement, method).remote(*args)
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _report_forever(self) -> None:
        """Tell the placement service what this replica holds, so that a restarted
        service can rebuild residency (a running one ignores its own incarnation)."""
        assert self.placement is not None and self.weights is not None
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            report = self.weights.report(self._in_use)
            if report is None or self.weights.bound is None:
                continue
            try:
                await self.placement.report.remote(report, self.weights.bound[0])
            except RayActorError:
                pass  # the service is restarting; the next report reaches the new one
            except Exception as error:  # keep reporting, but let the failure be seen
                logger.warning("residency report for %s failed: %s", report.expert, error)

    @contextlib.asynccontextmanager
    async def _leased(self, jobs: Sequence[BatchJob]) -> AsyncIterator[None]:
        """Hold the expert's bytes in device memory (and an active slot) for one batch;
        the batch's unfinished jobs end with `GrantExpired` at the grant's deadline."""
        if self.placement is None or self.weights is None:
            yield
            return
        async with self._serial:
            grant: Grant = await self._call_placement("acquire", self.settings.name, *self._holder)
            deadline = end_jobs_at_expiry(grant, jobs, self.settings.name)
            try:
                self.weights.bind(grant)
                self._in_use = True
                yield
            finally:
                self._in_use = False
                if deadline is not None:
                    deadline.cancel()
                await self._give_back(grant)

    async def _give_back(self, grant: Grant) -> None:
        if not await self._call_placement("release", grant):
            # Taken back at its deadline while this replica was slow or stopped; the
            # next grant says whether the bytes moved (then they are rebound).
            logger.warning(
                "expert %s: its grant (lease %d) had been taken back before it ended",
                self.settings.name,
                grant.lease.lease_id,
            )

    async def _run_batch(self, jobs: Sequence[BatchJob]) -> None:
        """One batch under one grant: the lease and the switch are paid once for all."""
        async with self._leased(jobs):
            await asyncio.to_thread(self.server.run_batch, jobs)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.batcher.generate(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        async for chunk in self.batcher.stream(request):
            yield chunk

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: unmap the arena, and remove it
        when no other process maps it (the whole application is being deleted)."""
        weights = getattr(self, "weights", None)
        if weights is None:
            return
        weights.arena.close()
        if weights.arena.path is not None:
            remove_unused(weights.arena.path)

    def info(self) -> dict[str, Any]:
        engine = self.server.engine
        return {
            "name": self.settings.name,
            "engine": self.settings.engine,
            "engine_class": type(engine).__name__,
            "kernel_injection": bool(getattr(engine, "kernel_injection", False)),
            "parameters": int(getattr(engine, "parameter_count", 0)),
            "requests": self.server.requests,
            "tiered": self.weights is not None,
            "rebinds": self.weights.rebinds if self.weights is not None else 0,
            "batches": self.batcher.batches,
            "batched_requests": self.batcher.batched_requests,
            "largest_batch": self.batcher.largest_batch,
            "pid": os.getpid(),
        }
