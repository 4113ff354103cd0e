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
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.serve.handle import DeploymentHandle

from actors.batching import RequestBatcher
from actors.engines.base import BatchJob, GenerationRequest, GenerationResult, StreamChunk
from actors.engines.kernel_injection import packed_layout, shared_skeleton
from actors.expert_server import ExpertServer, make_engine
from actors.weights.tiered_weights import TieredWeights
from cluster.config import ExpertSettings
from cluster.serve.object_store import RayObjectStore
from cluster.serve.placement_client import (
    PlacementClient,
    attach_arena,
    detach_arena,
    end_jobs_at_expiry,
)
from memory_tiers.ddr import expert_source
from memory_tiers.grant_service import REPORT_INTERVAL_S
from memory_tiers.packing import TensorIndex

logger = logging.getLogger("ray.serve")


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
        self.placement = PlacementClient(placement) if placement is not None else None
        # The bytes this replica was built for: it never binds or runs another source's.
        # Their layout is the placement service's decision, made from the same config
        # (Ray shows this replica a GPU exactly when the tiers are on one).
        gpu = placement is not None and bool(ray.get_gpu_ids())
        self.layout = packed_layout(settings.engine, Path(checkpoint_dir), gpu)
        self.source = expert_source(Path(checkpoint_dir), settings.dtype, self.layout)
        self.weights: TieredWeights | None = None
        self._serial = asyncio.Lock()
        self._in_use = False
        model = None
        grant = None
        if self.placement is not None:
            described = await self.placement.describe(settings.name, self.source)
            index = TensorIndex.from_json(described["index"])
            skeleton = await asyncio.to_thread(
                shared_skeleton, Path(checkpoint_dir), settings.dtype, settings.engine, self.layout
            )
            self.weights = TieredWeights(
                settings.name, index, attach_arena(described), skeleton, RayObjectStore().get
            )
            grant = await self.placement.acquire(settings.name, self.source)
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
            if grant is not None and self.placement is not None:
                await self.placement.give_back(grant)
        if self.placement is not None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        logger.info("expert %s ready (%s engine)", settings.name, settings.engine)

    async def _report_forever(self) -> None:
        """Tell the placement service what this replica holds, so that a restarted
        service can rebuild residency (a running one ignores its own incarnation)."""
        assert self.placement is not None and self.weights is not None
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            report = self.weights.report(self._in_use)
            bound = self.weights.bound
            if report is not None and bound is not None:
                await self.placement.report(report, bound[0])

    @contextlib.asynccontextmanager
    async def _leased(self, jobs: Sequence[BatchJob]) -> AsyncIterator[None]:
        """Hold the expert's bytes in device memory (and an active slot) for one batch;
        the batch's unfinished jobs end with `GrantExpired` at the grant's deadline."""
        if self.placement is None or self.weights is None:
            yield
            return
        async with self._serial:
            grant = await self.placement.acquire(self.settings.name, self.source)
            deadline = end_jobs_at_expiry(grant, jobs, self.settings.name)
            try:
                self.weights.bind(grant)
                self._in_use = True
                yield
            finally:
                self._in_use = False
                if deadline is not None:
                    deadline.cancel()
                await self.placement.give_back(grant)

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
        if weights is not None and weights.arena is not None:
            detach_arena(weights.arena)

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
