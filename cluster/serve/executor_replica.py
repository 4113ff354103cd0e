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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.batching import RequestBatcher
from actors.engines.base import BatchJob, GenerationRequest, GenerationResult, StreamChunk
from actors.engines.kernel_injection import packed_layout
from actors.executor import ExecutorExpert, ExpertExecutor, ExpertSpec
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


class UnknownExpert(LookupError):
    """A request named an expert this executor pool does not serve."""


@dataclass
class LoadedExpert:
    """What Serve's multiplexing caches per expert: the runnable expert and its queue,
    replaced in place when a config change alters the expert (Serve's cache keeps this
    holder; batches already queued finish on the expert they were queued for)."""

    expert: ExecutorExpert
    batcher: RequestBatcher
    digest: str
    requests: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ExecutorReplica:
    """One executor of the pool; see the module docstring."""

    def __init__(self, placement: DeploymentHandle, max_experts: int, preload: bool = True) -> None:
        self.settings: dict[str, ExpertSettings] = {}
        self.checkpoints: dict[str, Path] = {}
        self.placement = PlacementClient(placement)
        self.executor: ExpertExecutor | None = None
        self.max_experts = max_experts
        self.preload = preload
        self.reconfigurations = 0
        self._in_use: set[str] = set()
        self.requests: dict[str, int] = {}
        self._reporter: asyncio.Task[None] | None = None
        self.layouts: dict[str, str] = {}
        # Ray shows this executor its GPU share's device, or none: the same test the
        # placement service makes from tiers.device (the config requires they agree).
        self.gpu = bool(ray.get_gpu_ids())

        # Serve keeps the LRU cache on the decorated callable; a closure per replica lets
        # its size come from the config.
        @serve.multiplexed(max_num_models_per_replica=max_experts)
        async def get_expert(expert_id: str) -> LoadedExpert:
            return LoadedExpert(*await self._build(expert_id))

        self.get_expert = get_expert

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The pooled experts (first call, before any request; then on every `coe apply`
        that changes them): a new expert is served at once, a changed one is rebuilt at
        its next request, and the executors keep running."""
        self.settings = {
            e["name"]: ExpertSettings.model_validate(e) for e in user_config["experts"]
        }
        self.checkpoints = {name: Path(p) for name, p in user_config["checkpoints"].items()}
        self.layouts.clear()
        self.reconfigurations += 1
        if self._reporter is None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
            if self.preload:
                # Through the multiplexed loader, so Serve learns (and routes by) what is ready.
                for name in list(self.settings)[: self.max_experts]:
                    await self.get_expert(name)
        logger.info("executor configured for %d experts", len(self.settings))

    def _source(self, name: str) -> str:
        """The bytes an expert is built for here: it never binds or runs another's."""
        return expert_source(self.checkpoints[name], self.settings[name].dtype, self._layout(name))

    def _layout(self, name: str) -> str:
        """How the placement service packs the expert (the same decision, made from the
        same config: kernel-injected for a DeepSpeed expert on GPU tiers, if it can be)."""
        layout = self.layouts.get(name)
        if layout is None:
            settings = self.settings[name]
            layout = packed_layout(settings.engine, self.checkpoints[name], self.gpu)
            self.layouts[name] = layout
        return layout

    def _digest(self, name: str) -> str:
        """What an expert's runnable state is built from; a change means a rebuild."""
        settings = self.settings[name]
        return f"{settings.model_dump_json()}|{self.checkpoints[name]}"

    async def _build(self, name: str) -> tuple[ExecutorExpert, RequestBatcher, str]:
        settings = self.settings.get(name)
        if settings is None:
            raise UnknownExpert(f"expert {name!r} does not run on the executor pool")
        digest = self._digest(name)
        described = await self.placement.describe(name, self._source(name))
        if self.executor is None:
            self.executor = ExpertExecutor(attach_arena(described), fetch=RayObjectStore().get)
        spec = ExpertSpec(
            name=name,
            checkpoint_dir=self.checkpoints[name],
            engine=settings.engine,
            dtype=settings.dtype,
            chat_format=settings.chat_format,
            system_prompt=settings.system_prompt,
            layout=self._layout(name),
        )
        index = TensorIndex.from_json(described["index"])
        expert = await asyncio.to_thread(self.executor.load, spec, index)

        async def run(jobs: Sequence[BatchJob]) -> None:
            await self._run_batch(expert, jobs)

        logger.info("executor: %s loaded", name)
        return expert, RequestBatcher(run, settings.max_batch_size), digest

    async def _run_batch(self, expert: ExecutorExpert, jobs: Sequence[BatchJob]) -> None:
        """One batch under one grant, with the expert bound into its shared skeleton."""
        assert self.executor is not None
        name = expert.spec.name
        async with expert.skeleton.lock:
            grant = await self.placement.acquire(name, self._source(name))
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
        if name in self.settings and loaded.digest != self._digest(name):
            async with loaded.lock:
                if loaded.digest != self._digest(name):
                    loaded.expert, loaded.batcher, loaded.digest = await self._build(name)
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

    async def describe(self) -> dict[str, Any]:
        """The multiplexed expert as this executor runs it (call with the expert as the
        handle's multiplexed_model_id): what a dedicated replica's `info` says."""
        name = serve.get_multiplexed_model_id()
        loaded: LoadedExpert = await self.get_expert(name)
        engine = loaded.expert.server.engine
        return {
            "name": name,
            "engine": loaded.expert.spec.engine,
            "engine_class": type(engine).__name__,
            "kernel_injection": bool(getattr(engine, "kernel_injection", False)),
            "parameters": int(getattr(engine, "parameter_count", 0)),
            "requests": loaded.requests,
            "skeleton": loaded.expert.skeleton.key,
            "rebinds": loaded.expert.weights.rebinds,
            "batches": loaded.batcher.batches,
            "pid": os.getpid(),
        }

    async def record_routing_stats(self) -> dict[str, Any]:
        """What the executors' request router ranks this executor by (Serve asks every
        `residency_router.STATS_PERIOD_S`): its device and the experts resident there."""
        device = self.placement.device
        if device is None:  # nothing described yet: no device chosen
            return {}
        try:
            residency = await self.placement.handle.residency.remote()
        except Exception as error:  # routing falls back to Serve's own choice
            logger.warning("executor: residency for routing unavailable: %s", error)
            return {"device": device}
        held = residency.get(device, {}).get("residents", [])
        return {"device": device, "resident": sorted(r["expert"] for r in held)}

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
        if executor is not None and executor.arena is not None:
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
