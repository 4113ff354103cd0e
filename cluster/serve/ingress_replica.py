"""The ingress replica: HTTP (OpenAI-compatible), gRPC and handle entry point.

Every replica process imports the module that defines its class, and an app has
one ingress but many experts; this module keeps the ingress free of torch, the
router's classifier (scipy) and the memory tiers, which only experts, the router
and the placement service need. tests/unit/test_replica_imports.py holds it to that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from ray.serve.handle import DeploymentHandle

from cluster.config import parse_config
from cluster.ingress.auth import ApiKeyGate
from cluster.ingress.grpc.methods import GrpcIngressMixin
from cluster.ingress.http_api import build_http_app
from cluster.ingress.service import ChatStream, CoEService
from cluster.serve.handle_backend import HandleBackend
from cluster.serve.metrics import ServeRequestMetrics


async def _relay(stream: ChatStream) -> AsyncIterator[dict[str, Any]]:
    """A stream's chunks; a caller that stops early closes it, which frees the expert."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        await stream.aclose()


class IngressReplica(GrpcIngressMixin):
    """HTTP (OpenAI-compatible) and handle entry point of the cluster."""

    def __init__(
        self,
        config: dict[str, Any],
        router: DeploymentHandle,
        experts: dict[str, DeploymentHandle],
        placement: DeploymentHandle | None = None,
        api_key: str | None = None,
        executors: DeploymentHandle | None = None,
        executor_experts: list[str] | None = None,
    ) -> None:
        settings = parse_config(config)
        experts = dict(experts)
        if executors is not None:
            # A pooled expert is the executor pool with the expert as the multiplexed
            # model id: Serve sends it to an executor that already holds that expert.
            for name in executor_experts or []:
                experts[name] = executors.options(multiplexed_model_id=name)
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
        async for chunk in _relay(await self.service.open_stream(body)):
            yield chunk

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """The same body and result as POST /v1/completions without streaming."""
        return await self.service.text_completion(body)

    async def completion_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """OpenAI text completion chunks; call with `handle.options(stream=True)`."""
        async for chunk in _relay(await self.service.open_text_stream(body)):
            yield chunk

    async def route(self, body: dict[str, Any]) -> dict[str, Any]:
        """The same as POST /v1/route."""
        return await self.service.route(body)

    def models(self) -> dict[str, Any]:
        return self.service.models()

    def api_key_fingerprint(self) -> str | None:
        """The running key's fingerprint, for `coe apply` to compare; never the key."""
        return self.gate.fingerprint

    def stats(self) -> dict[str, Any]:
        """This replica's request counts since it started (`coe status`)."""
        return self.observer.snapshot()
