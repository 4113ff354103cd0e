"""The Ray Serve deployments: experts, the router, and the ingress.

Each replica class wraps a plain class from `actors/`, `router/` or
`cluster/service.py` and only adds what Serve needs (handles, threads for blocking
work); the `Deployment` objects at the bottom are the only place they meet Serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Deployment
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from actors.async_stream import iterate_in_thread
from actors.engine import GenerationRequest, GenerationResult, StreamChunk
from actors.expert_server import ExpertServer, make_engine
from actors.tiered_weights import Grant, TieredWeights
from cluster.auth import ApiKeyGate
from cluster.config import ExpertSettings, parse_config
from cluster.errors import Overloaded
from cluster.grpc_ingress import GrpcIngressMixin
from cluster.http_api import build_http_app
from cluster.metrics import ServeRequestMetrics
from cluster.placement import REPORT_INTERVAL_S, PlacementReplica
from cluster.service import CoEService
from cluster.setup_steps import build_router
from memory_tiers.arena import DeviceArena
from memory_tiers.packing import TensorIndex
from router.embedder import make_embedder
from router.two_step import RouteDecision, TwoStepRouter

logger = logging.getLogger("ray.serve")
# How long an expert replica keeps retrying while the placement service restarts.
PLACEMENT_RETRY_S = 120.0


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
            arena = DeviceArena.attach_file(Path(described["arena_path"]))
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
            await asyncio.to_thread(self.server.warm_up)
        finally:
            if grant is not None:
                await self._call_placement("release", grant)
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
    async def _leased(self) -> AsyncIterator[None]:
        """Hold the expert's bytes in device memory (and an active slot) for one request."""
        if self.placement is None or self.weights is None:
            yield
            return
        async with self._serial:
            grant: Grant = await self._call_placement("acquire", self.settings.name, *self._holder)
            try:
                self.weights.bind(grant)
                self._in_use = True
                yield
            finally:
                self._in_use = False
                await self._call_placement("release", grant)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        async with self._leased():
            return await asyncio.to_thread(self.server.generate, request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        async with self._leased():
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
            "tiered": self.weights is not None,
            "rebinds": self.weights.rebinds if self.weights is not None else 0,
            "pid": os.getpid(),
        }


class RouterReplica:
    """The two-step router; concurrent prompts are classified in one batch.

    The config arrives as Serve's `user_config`, so a changed map, new categories or
    new expert scores take effect through `reconfigure` without restarting the replica.
    """

    def __init__(self) -> None:
        self.router: TwoStepRouter | None = None
        self.embedder: Any = None
        self.embedder_name = ""
        self.reconfigurations = 0

    def reconfigure(self, config: dict[str, Any]) -> None:
        settings = parse_config(config)
        if settings.router.embedder != self.embedder_name:
            self.embedder = make_embedder(settings.router.embedder)
            self.embedder_name = settings.router.embedder
        self.router = build_router(settings, self.embedder)
        batched: Any = self.route  # serve.batch adds the setters at run time
        batched.set_max_batch_size(settings.router.max_batch_size)
        batched.set_batch_wait_timeout_s(settings.router.batch_wait_timeout_s)
        self.reconfigurations += 1
        logger.info(
            "router configured (%d): categories %s",
            self.reconfigurations,
            list(self.router.classifier.categories),
        )

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def route(self, prompts: list[str]) -> list[RouteDecision]:
        assert self.router is not None  # Serve reconfigures before the first request
        return await asyncio.to_thread(self.router.route_batch, prompts)

    def info(self) -> dict[str, Any]:
        assert self.router is not None
        return {
            "pid": os.getpid(),
            "reconfigurations": self.reconfigurations,
            "categories": list(self.router.classifier.categories),
            "mode": self.router.mode,
        }


class HandleBackend:
    """The service's `Backend` made of Serve deployment handles."""

    def __init__(
        self,
        router: DeploymentHandle,
        experts: dict[str, DeploymentHandle],
        placement: DeploymentHandle | None = None,
        retry_after_s: int = 1,
    ) -> None:
        self.router = router
        self.experts = experts
        self.retry_after_s = retry_after_s
        self.expert_names = sorted(experts)
        self.placement = placement
        self._hints: set[Any] = set()

    async def route(self, prompt: str) -> RouteDecision:
        decision: RouteDecision = await self.router.route.remote(prompt)
        if self.placement is not None:
            self._prefetch(decision.expert)
        return decision

    def _prefetch(self, expert: str) -> None:
        """Fire-and-forget: start the switch while the request waits for its replica."""
        assert self.placement is not None
        hint = asyncio.ensure_future(self.placement.prefetch.remote(expert))
        self._hints.add(hint)
        hint.add_done_callback(self._hint_done)

    def _hint_done(self, hint: Any) -> None:
        self._hints.discard(hint)
        if not hint.cancelled() and hint.exception() is not None:
            logger.warning("prefetch hint failed: %s", hint.exception())

    def _overloaded(self, expert: str) -> Overloaded:
        return Overloaded(
            f"expert {expert!r} has too many queued requests; retry later",
            retry_after_s=self.retry_after_s,
        )

    async def generate(self, expert: str, request: GenerationRequest) -> GenerationResult:
        response = self.experts[expert].generate.remote(request)
        try:
            result: GenerationResult = await response
        except BackPressureError:
            raise self._overloaded(expert) from None
        except asyncio.CancelledError:
            # Cancelling the awaiting task does not cancel the remote call: a timed-out or
            # abandoned request must free the expert's slot too.
            response.cancel()
            raise
        return result

    async def stream(self, expert: str, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        handle = self.experts[expert].options(stream=True)
        chunks = cast(DeploymentResponseGenerator, handle.stream.remote(request))
        finished = False
        try:
            async for chunk in chunks:
                yield chunk
            finished = True
        except BackPressureError:
            raise self._overloaded(expert) from None
        finally:
            if not finished:
                chunks.cancel()  # a client that went away frees the expert at once


class IngressReplica(GrpcIngressMixin):
    """HTTP (OpenAI-compatible) and handle entry point of the cluster."""

    def __init__(
        self,
        config: dict[str, Any],
        router: DeploymentHandle,
        experts: dict[str, DeploymentHandle],
        placement: DeploymentHandle | None = None,
        api_key: str | None = None,
    ) -> None:
        settings = parse_config(config)
        backend = HandleBackend(router, experts, placement, settings.serve.retry_after_s)
        self.observer = ServeRequestMetrics()
        self.service = CoEService(settings.serve, backend, observer=self.observer)
        # The key arrives as its own argument: the config dict replicas see never holds it.
        self.gate = ApiKeyGate(api_key)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self.service, self.gate)

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """The same body and result as POST /v1/chat/completions without streaming."""
        return await self.service.chat(body)

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """OpenAI chunk objects; call with `handle.options(stream=True)`."""
        stream = await self.service.open_stream(body)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # a caller that stops early frees the expert

    async def route(self, body: dict[str, Any]) -> dict[str, Any]:
        """The same as POST /v1/route."""
        return await self.service.route(body)

    def models(self) -> dict[str, Any]:
        return self.service.models()

    def stats(self) -> dict[str, Any]:
        """This replica's request counts since it started (`coe status`)."""
        return self.observer.snapshot()


ExpertDeployment: Deployment = serve.deployment()(ExpertReplica)
RouterDeployment: Deployment = serve.deployment()(RouterReplica)
PlacementDeployment: Deployment = serve.deployment()(PlacementReplica)
IngressDeployment: Deployment = serve.deployment()(serve.ingress()(IngressReplica))
