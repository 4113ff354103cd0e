"""The Ray Serve deployments: experts, the router, and the ingress.

Each replica class wraps a plain class from `actors/`, `router/` or
`cluster/service.py` and only adds what Serve needs (handles, threads for blocking
work); the `Deployment` objects at the bottom are the only place they meet Serve.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.serve import Deployment
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from actors.async_stream import iterate_in_thread
from actors.engine import GenerationRequest, GenerationResult, StreamChunk
from actors.expert_server import ExpertServer, make_engine
from cluster.config import ExpertSettings, parse_config
from cluster.http_api import build_http_app
from cluster.service import CoEService
from cluster.setup_steps import build_router
from router.two_step import RouteDecision

logger = logging.getLogger("ray.serve")


class ExpertReplica:
    """One expert LLM; its name, engine and autoscaling come from the config."""

    def __init__(self, expert: dict[str, Any], checkpoint_dir: str) -> None:
        settings = ExpertSettings.model_validate(expert)
        engine = make_engine(
            settings.name,
            settings.engine,
            Path(checkpoint_dir),
            settings.dtype,
            settings.chat_format,
        )
        self.server = ExpertServer(settings.name, engine, settings.system_prompt)
        self.server.warm_up()
        self.settings = settings
        logger.info("expert %s ready (%s engine)", settings.name, settings.engine)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await asyncio.to_thread(self.server.generate, request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        async for chunk in iterate_in_thread(
            lambda cancellation: self.server.stream(request, cancellation)
        ):
            yield chunk

    def info(self) -> dict[str, Any]:
        engine = self.server.engine
        return {
            "name": self.settings.name,
            "engine": self.settings.engine,
            "engine_class": type(engine).__name__,
            "kernel_injection": bool(getattr(engine, "kernel_injection", False)),
            "parameters": int(getattr(engine, "parameter_count", 0)),
            "requests": self.server.requests,
        }


class RouterReplica:
    """The two-step router; concurrent prompts are classified in one batch."""

    def __init__(self, config: dict[str, Any]) -> None:
        settings = parse_config(config)
        self.router = build_router(settings)
        batched: Any = self.route  # serve.batch adds the setters at run time
        batched.set_max_batch_size(settings.router.max_batch_size)
        batched.set_batch_wait_timeout_s(settings.router.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def route(self, prompts: list[str]) -> list[RouteDecision]:
        return await asyncio.to_thread(self.router.route_batch, prompts)


class HandleBackend:
    """The service's `Backend` made of Serve deployment handles."""

    def __init__(self, router: DeploymentHandle, experts: dict[str, DeploymentHandle]) -> None:
        self.router = router
        self.experts = experts
        self.expert_names = sorted(experts)

    async def route(self, prompt: str) -> RouteDecision:
        decision: RouteDecision = await self.router.route.remote(prompt)
        return decision

    async def generate(self, expert: str, request: GenerationRequest) -> GenerationResult:
        result: GenerationResult = await self.experts[expert].generate.remote(request)
        return result

    async def stream(self, expert: str, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        handle = self.experts[expert].options(stream=True)
        chunks = cast(DeploymentResponseGenerator, handle.stream.remote(request))
        async for chunk in chunks:
            yield chunk


class IngressReplica:
    """HTTP (OpenAI-compatible) and handle entry point of the cluster."""

    def __init__(
        self,
        config: dict[str, Any],
        router: DeploymentHandle,
        experts: dict[str, DeploymentHandle],
    ) -> None:
        settings = parse_config(config)
        self.service = CoEService(settings.serve, HandleBackend(router, experts))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self.service)

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """The same body and result as POST /v1/chat/completions without streaming."""
        return await self.service.chat(body)

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """OpenAI chunk objects; call with `handle.options(stream=True)`."""
        prepared = await self.service.prepare(body)
        async for chunk in self.service.stream_chunks(prepared):
            yield chunk

    async def route(self, body: dict[str, Any]) -> dict[str, Any]:
        """The same as POST /v1/route."""
        return await self.service.route(body)

    def models(self) -> dict[str, Any]:
        return self.service.models()


ExpertDeployment: Deployment = serve.deployment()(ExpertReplica)
RouterDeployment: Deployment = serve.deployment()(RouterReplica)
IngressDeployment: Deployment = serve.deployment()(serve.ingress()(IngressReplica))
