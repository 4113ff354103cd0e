"""The executor replica: runs any pooled expert, switching experts in through the tiers.

Requests name their expert with Serve's multiplexed model id; Serve's model-aware
routing sends them to an executor that already holds that expert (its tokenizer,
engine and batcher: see `actors/executor.py`), and the `@serve.multiplexed` loader
makes the expert runnable on a miss. The weights themselves are never loaded here:
each batch takes a grant from the placement service, which copies the expert's bytes
into the shared arena when they are not resident (the tier switch), and the
executor only rebinds its shared skeleton to that region.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.batching import RequestBatcher
from actors.engines.base import BatchJob, GenerationRequest, GenerationResult, StreamChunk
from actors.executor import ExecutorExpert, ExpertExecutor, ExpertSpec
from cluster.config import ExpertSettings
from cluster.serve.placement_client import PlacementClient, detach_arena, end_jobs_at_expiry
from memory_tiers.arena import DeviceArena
from memory_tiers.grant_service import REPORT_INTERVAL_S
from memory_tiers.packing import TensorIndex

logger = logging.getLogger("ray.serve")


class UnknownExpert(LookupError):
    """A request named an expert this executor pool does not serve."""


@dataclass
class LoadedExpert:
    """What Serve's multiplexing caches per expert: the runnable expert and its queue."""

    expert: ExecutorExpert
    batcher: RequestBatcher
    requests: int = 0


class ExecutorReplica:
    """One executor of the pool; see the module docstring."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        experts: list[dict[str, Any]],
        checkpoints: dict[str, str],
        placement: DeploymentHandle,
        max_experts: int,
    ) -> None:
        self.settings = {e["name"]: ExpertSettings.model_validate(e) for e in experts}
        self.checkpoints = {name: Path(path) for name, path in checkpoints.items()}
        self.placement = PlacementClient(placement)
        self.executor: ExpertExecutor | None = None
        self._in_use: set[str] = set()
        self.requests: dict[str, int] = {}

        # Serve keeps the LRU cache on the decorated callable; a closure per replica lets
        # its size come from the config.
        @serve.multiplexed(max_num_models_per_replica=max_experts)
        async def get_expert(expert_id: str) -> LoadedExpert:
            return await self._load(expert_id)

        self.get_expert = get_expert
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        logger.info("executor ready for %d experts", len(self.settings))

    async def _load(self, name: str) -> LoadedExpert:
        settings = self.settings.get(name)
        if settings is None:
            raise UnknownExpert(f"expert {name!r} does not run on the executor pool")
        described = await self.placement.call("describe", name)
        if self.executor is None:
            # Read-only: only the placement service writes the arena.
            arena = DeviceArena.attach_file(Path(described["arena_path"]), writable=False)
            self.executor = ExpertExecutor(arena)
        spec = ExpertSpec(
            name=name,
            checkpoint_dir=self.checkpoints[name],
            engine=settings.engine,
            dtype=settings.dtype,
            chat_format=settings.chat_format,
            system_prompt=settings.system_prompt,
        )
        index = TensorIndex.from_json(described["index"])
        expert = await asyncio.to_thread(self.executor.load, spec, index)

        async def run(jobs: Sequence[BatchJob]) -> None:
            await self._run_batch(expert, jobs)

        logger.info("executor: %s loaded", name)
        return LoadedExpert(expert, RequestBatcher(run, settings.max_batch_size))

    async def _run_batch(self, expert: ExecutorExpert, jobs: Sequence[BatchJob]) -> None:
        """One batch under one grant, with the expert bound into its shared skeleton."""
        assert self.executor is not None
        name = expert.spec.name
        async with expert.skeleton.lock:
            grant = await self.placement.acquire(name)
            deadline = end_jobs_at_expiry(grant, jobs, name)
            self._in_use.add(name)
            try:
                await asyncio.to_thread(self.executor.run, expert, grant, jobs)
            finally:
                self._in_use.discard(name)
                if deadline is not None:
                    deadline.cancel()
                await self.placement.give_back(grant)

    async def _loaded(self) -> LoadedExpert:
        name = serve.get_multiplexed_model_id()
        loaded: LoadedExpert = await self.get_expert(name)
        loaded.requests += 1
        self.requests[name] = self.requests.get(name, 0) + 1
        return loaded

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        loaded = await self._loaded()
        return await loaded.batcher.generate(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        loaded = await self._loaded()
        async for chunk in loaded.batcher.stream(request):
            yield chunk

    async def _report_forever(self) -> None:
        """Tell the placement service which regions the skeletons are bound to, so that
        a restarted service can rebuild residency."""
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            if self.executor is None:
                continue
            for report, incarnation in self.executor.reports(set(self._in_use)):
                await self.placement.report(report, incarnation)

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: unmap the arena, and remove it
        when no other process maps it (the whole application is being deleted)."""
        executor = getattr(self, "executor", None)
        if executor is not None:
            detach_arena(executor.arena)

    def info(self) -> dict[str, Any]:
        executor = self.executor
        weights = [] if executor is None else list(executor.last_bound.values())
        return {
            "executor": True,
            "experts": sorted(self.settings),
            "requests": dict(sorted(self.requests.items())),
            "loads": executor.loads if executor is not None else 0,
            "skeletons": len(executor.skeletons) if executor is not None else 0,
            "rebinds": executor.rebinds if executor is not None else 0,
            "bound": sorted(w.expert for w in weights if w.bound is not None),
            "pid": os.getpid(),
        }
