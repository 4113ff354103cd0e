"""The baseline a Ray Serve user writes today: Serve model multiplexing.

One deployment serves every expert through `@serve.multiplexed(max_num_models_per_replica=K)`;
its loader builds the expert with `AutoModelForCausalLM.from_pretrained` on the expert's
checkpoint (inside `TransformersEngine`). Requests reach it through the same ingress code
as the CoE cluster (`CoEService` and the OpenAI HTTP API), so the comparison measures the
way experts are held and switched, not a different front end.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.serve import Application, Deployment
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from actors.async_stream import iterate_in_thread
from actors.engines.base import GenerationRequest, GenerationResult, StreamChunk
from actors.engines.transformers_engine import TransformersEngine
from actors.expert_server import ExpertServer
from cluster.config import CoEConfig, ExpertSettings, ServeSettings
from cluster.ingress.api_errors import InvalidRequest
from cluster.ingress.http_api import build_http_app
from cluster.ingress.service import CoEService
from router.decision import RouteDecision

MULTIPLEX_NAME = "multiplexed-experts"


class MultiplexedExperts:
    """Every expert behind one deployment; at most `max_models` loaded per replica."""

    def __init__(
        self, experts: list[dict[str, Any]], checkpoints: dict[str, str], max_models: int
    ) -> None:
        self.settings = {e["name"]: ExpertSettings.model_validate(e) for e in experts}
        self.checkpoints = {name: Path(path) for name, path in checkpoints.items()}
        self.loads = 0
        self.load_seconds = 0.0
        self.requests = 0
        self.loaded: dict[str, int] = {}  # expert -> weight bytes, while loaded
        self.peak_loaded_bytes = 0

        # Serve keeps the LRU cache on the decorated object; a closure per replica lets K
        # come from the application's arguments.
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(model_id: str) -> ExpertServer:
            return await self._load(model_id)

        self.get_model = get_model

    async def _load(self, model_id: str) -> ExpertServer:
        settings = self.settings.get(model_id)
        if settings is None:
            raise InvalidRequest(f"unknown expert {model_id!r}", param="model")
        started = time.monotonic()
        engine = await asyncio.to_thread(
            TransformersEngine,
            model_id,
            self.checkpoints[model_id],
            settings.dtype,
            settings.chat_format,
        )
        server = _Unloadable(model_id, engine, settings.system_prompt, self)
        self.loads += 1
        self.load_seconds += time.monotonic() - started
        self.loaded[model_id] = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        self.peak_loaded_bytes = max(self.peak_loaded_bytes, sum(self.loaded.values()))
        return server

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        server = await self.get_model(serve.get_multiplexed_model_id())
        self.requests += 1
        return await asyncio.to_thread(server.generate, request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        server = await self.get_model(serve.get_multiplexed_model_id())
        self.requests += 1
        async for chunk in iterate_in_thread(
            lambda cancellation: server.stream(request, cancellation)
        ):
            yield chunk

    async def info(self) -> dict[str, Any]:
        return {
            "loads": self.loads,
            "load_seconds": self.load_seconds,
            "requests": self.requests,
            "loaded": sorted(self.loaded),
            "loaded_bytes": sum(self.loaded.values()),
            "peak_loaded_bytes": self.peak_loaded_bytes,
            "pid": os.getpid(),
        }


class _Unloadable(ExpertServer):
    """Serve calls `__del__` on the model it evicts: forget its bytes there."""

    def __init__(
        self, name: str, engine: TransformersEngine, system_prompt: str, owner: MultiplexedExperts
    ) -> None:
        super().__init__(name, engine, system_prompt)
        self._owner = owner

    def __del__(self) -> None:
        self._owner.loaded.pop(self.name, None)


class MultiplexBackend:
    """`CoEService`'s backend over the multiplexed deployment: named experts only."""

    def __init__(self, handle: DeploymentHandle, expert_names: list[str]) -> None:
        self.handle = handle
        self.expert_names = sorted(expert_names)

    async def route(self, prompt: str) -> RouteDecision:
        raise InvalidRequest("this baseline serves named experts only", param="model")

    async def generate(self, expert: str, request: GenerationRequest) -> GenerationResult:
        handle = self.handle.options(multiplexed_model_id=expert)
        result: GenerationResult = await handle.generate.remote(request)
        return result

    async def stream(self, expert: str, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        handle = self.handle.options(multiplexed_model_id=expert, stream=True)
        chunks = cast(DeploymentResponseGenerator, handle.stream.remote(request))
        async for chunk in chunks:
            yield chunk


class MultiplexIngress:
    def __init__(
        self, limits: dict[str, Any], experts: DeploymentHandle, expert_names: list[str]
    ) -> None:
        backend = MultiplexBackend(experts, expert_names)
        self.service = CoEService(ServeSettings.model_validate(limits), backend)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self.service)


MultiplexDeployment: Deployment = serve.deployment()(MultiplexedExperts)
MultiplexIngressDeployment: Deployment = serve.deployment()(serve.ingress()(MultiplexIngress))


def build_multiplex_app(
    config: CoEConfig,
    checkpoints: dict[str, Path],
    max_models: int,
    replicas: int = 1,
    num_gpus: float = 0.0,
) -> Application:
    """The experts of `config` behind one multiplexed deployment of `replicas` replicas,
    each with `num_gpus` of a GPU (its engines load onto it when it has one)."""
    if max_models < 1:
        raise ValueError(f"max_models must be >= 1, got {max_models}")
    experts = MultiplexDeployment.options(
        name=MULTIPLEX_NAME,
        num_replicas=replicas,
        # Every request enters the one replica and waits there (for its model's load or
        # its engine), so the counters in `info` stay reachable under load.
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0, "num_gpus": num_gpus},
    ).bind(
        [e.model_dump(mode="json") for e in config.experts],
        {name: str(path) for name, path in checkpoints.items()},
        max_models,
    )
    ingress = MultiplexIngressDeployment.options(
        name="ingress", ray_actor_options={"num_cpus": config.serve.ingress_num_cpus}
    )
    return ingress.bind(
        config.serve.model_dump(mode="json"), experts, [e.name for e in config.experts]
    )
