"""The ingress's `Backend` made of Serve deployment handles (see cluster/ingress/service.py).

Imported by the ingress replica, so it stays as light as the ingress: handles and
the engine's request/result dataclasses, no router, torch or memory tiers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from actors.engines.base import (
    ContextLengthExceeded,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
)
from cluster.ingress.api_errors import Overloaded, RouterUnavailable
from router.decision import RouteDecision

logger = logging.getLogger("ray.serve")

# A hint can evict an expert and copy its bytes (a gigabyte for a large one) into the
# device; /v1/route costs the client nothing else, so without a floor a loop of route
# calls churns the tiers. A request follows its hint within milliseconds, so one hint
# per expert per second loses no useful prefetch.
PREFETCH_MIN_INTERVAL_S = 1.0


def _unwrapped(error: ContextLengthExceeded) -> ContextLengthExceeded:
    """Serve raises an expert's exception as a `RayTaskError` that is also an instance of
    its class, but whose `str()` is the remote traceback; hand on the original."""
    cause = error.cause if isinstance(error, RayTaskError) else error
    return cause if isinstance(cause, ContextLengthExceeded) else error


class HandleBackend:
    """The service's `Backend` made of Serve deployment handles."""

    def __init__(
        self,
        router: DeploymentHandle,
        experts: dict[str, DeploymentHandle],
        placement: DeploymentHandle | None = None,
        retry_after_s: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.experts = experts
        self.retry_after_s = retry_after_s
        self.expert_names = sorted(experts)
        self.placement = placement
        self.clock = clock
        self._hints: dict[str, asyncio.Future[Any]] = {}  # in flight, one per expert
        self._hinted_at: dict[str, float] = {}

    async def route(self, prompt: str) -> RouteDecision:
        try:
            decision: RouteDecision = await self.router.route.remote(prompt)
        except BackPressureError:
            raise self._overloaded("the router") from None
        except (RayActorError, DeploymentUnavailableError) as error:
            # The router replica died with this request inside it (Serve sends requests
            # that arrive meanwhile to its replacement once that is up): a 503 to retry.
            logger.warning("route failed, the router replica is gone: %s", type(error).__name__)
            raise RouterUnavailable(
                "the router is unavailable (Serve is replacing its replica); retry later",
                retry_after_s=self.retry_after_s,
            ) from None
        if self.placement is not None:
            self._prefetch(decision.expert)
        return decision

    def _prefetch(self, expert: str) -> None:
        """Fire-and-forget: start the switch while the request waits for its replica.
        Coalesced: none while this expert's last hint is in flight or was sent less than
        `PREFETCH_MIN_INTERVAL_S` ago."""
        assert self.placement is not None
        now, last = self.clock(), self._hinted_at.get(expert)
        if expert in self._hints or (last is not None and now - last < PREFETCH_MIN_INTERVAL_S):
            return
        self._hinted_at[expert] = now
        hint = asyncio.ensure_future(self.placement.prefetch.remote(expert))
        self._hints[expert] = hint
        hint.add_done_callback(lambda done: self._hint_done(expert, done))

    def _hint_done(self, expert: str, hint: asyncio.Future[Any]) -> None:
        if self._hints.get(expert) is hint:
            del self._hints[expert]
        if not hint.cancelled() and hint.exception() is not None:
            logger.warning("prefetch hint failed: %s", hint.exception())

    def _overloaded(self, what: str) -> Overloaded:
        return Overloaded(
            f"{what} has too many queued requests; retry later",
            retry_after_s=self.retry_after_s,
        )

    async def generate(self, expert: str, request: GenerationRequest) -> GenerationResult:
        response = self.experts[expert].generate.remote(request)
        try:
            result: GenerationResult = await response
        except BackPressureError:
            raise self._overloaded(f"expert {expert!r}") from None
        except ContextLengthExceeded as error:
            raise _unwrapped(error) from None
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
            raise self._overloaded(f"expert {expert!r}") from None
        except ContextLengthExceeded as error:
            raise _unwrapped(error) from None
        finally:
            if not finished:
                chunks.cancel()  # a client that went away frees the expert at once
