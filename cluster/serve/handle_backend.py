"""The ingress's `Backend` made of Serve deployment handles (see cluster/ingress/service.py).

Imported by the ingress replica, so it stays as light as the ingress: handles and
the engine's request/result dataclasses, no router, torch or memory tiers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from actors.engines.base import GenerationRequest, GenerationResult, StreamChunk
from cluster.ingress.api_errors import Overloaded
from router.decision import RouteDecision

logger = logging.getLogger("ray.serve")


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
