"""`HandleBackend` over fake deployment handles (no Ray started): prefetch hints are
coalesced per expert, a full router queue is a 429, and an expert's refusal of a prompt
past its context window arrives as the engine raised it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from actors.engines.base import ContextLengthExceeded, GenerationRequest
from cluster.ingress.api_errors import Overloaded
from cluster.serve.handle_backend import PREFETCH_MIN_INTERVAL_S, HandleBackend
from router.decision import RouteDecision


class Method:
    """`handle.method.remote(...)`: records the call and returns what `answer` makes."""

    def __init__(self, answer: Callable[..., Any]) -> None:
        self.answer = answer
        self.calls: list[tuple[Any, ...]] = []

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.answer(*args)


class FakeRouter:
    """Routes "sum" prompts to math, the rest to general; `refuse` is raised instead."""

    def __init__(self, refuse: Exception | None = None) -> None:
        self.refuse = refuse
        self.route = Method(self._route)

    async def _route(self, prompt: str) -> RouteDecision:
        if self.refuse is not None:
            raise self.refuse
        expert = "math" if "sum" in prompt else "general"
        return RouteDecision(expert, expert, 0.9, False, {expert: 0.9})


class FakePlacement:
    """Every hint stays in flight until the test finishes it."""

    def __init__(self) -> None:
        self.pending: list[asyncio.Future[None]] = []
        self.prefetch = Method(self._hint)

    def _hint(self, expert: str) -> asyncio.Future[None]:
        self.pending.append(asyncio.get_running_loop().create_future())
        return self.pending[-1]

    @property
    def hinted(self) -> list[str]:
        return [args[0] for args in self.prefetch.calls]

    async def finish_all(self) -> None:
        for hint in self.pending:
            if not hint.done():
                hint.set_result(None)
        await asyncio.sleep(0)  # the backend's done callbacks run


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def backend_with(
    placement: FakePlacement, clock: Clock, router: FakeRouter | None = None
) -> HandleBackend:
    return HandleBackend(router or FakeRouter(), {}, placement, retry_after_s=3, clock=clock)  # type: ignore[arg-type]


def test_one_hint_per_expert_while_one_is_in_flight() -> None:
    placement, clock = FakePlacement(), Clock()

    async def scenario() -> None:
        backend = backend_with(placement, clock)
        for _ in range(5):
            assert (await backend.route("what is the sum")).expert == "math"
        await backend.route("hello")
        assert placement.hinted == ["math", "general"]
        # Still in flight long after the interval: no second copy of the same expert.
        clock.now += 10 * PREFETCH_MIN_INTERVAL_S
        await backend.route("what is the sum")
        assert placement.hinted == ["math", "general"]
        await placement.finish_all()

    asyncio.run(scenario())


def test_no_hint_for_an_expert_hinted_within_the_interval() -> None:
    placement, clock = FakePlacement(), Clock()

    async def scenario() -> None:
        backend = backend_with(placement, clock)
        await backend.route("what is the sum")
        await placement.finish_all()
        clock.now += PREFETCH_MIN_INTERVAL_S / 2
        await backend.route("what is the sum")
        assert placement.hinted == ["math"]
        clock.now += PREFETCH_MIN_INTERVAL_S
        await backend.route("what is the sum")
        assert placement.hinted == ["math", "math"]
        await placement.finish_all()

    asyncio.run(scenario())


def test_a_failed_hint_does_not_block_the_next_one(caplog: pytest.LogCaptureFixture) -> None:
    placement, clock = FakePlacement(), Clock()

    async def scenario() -> None:
        backend = backend_with(placement, clock)
        await backend.route("what is the sum")
        placement.pending[0].set_exception(RuntimeError("placement restarting"))
        await asyncio.sleep(0)
        clock.now += PREFETCH_MIN_INTERVAL_S
        await backend.route("what is the sum")
        assert placement.hinted == ["math", "math"]
        await placement.finish_all()

    asyncio.run(scenario())
    assert "placement restarting" in caplog.text


def test_a_full_router_queue_is_a_429_with_retry_after() -> None:
    placement, clock = FakePlacement(), Clock()
    router = FakeRouter(refuse=BackPressureError(num_queued_requests=256, max_queued_requests=256))
    backend = backend_with(placement, clock, router)
    with pytest.raises(Overloaded) as refused:
        asyncio.run(backend.route("what is the sum"))
    assert refused.value.status_code == 429
    assert refused.value.headers() == {"Retry-After": "3"}
    assert "router" in refused.value.message
    assert placement.hinted == []


# --- an expert's refusal comes back as the engine raised it -------------------------------

REFUSAL = ContextLengthExceeded(2048, 2000, 64)
REQUEST = GenerationRequest((), 64, prompt="x")


def as_serve_raises_it(error: Exception) -> Exception:
    """What awaiting a Serve response raises for an exception in the replica."""
    wrapped = RayTaskError("generate", "Traceback: ...", error, proctitle="x", ip="127.0.0.1")
    return wrapped.as_instanceof_cause()


class Responses:
    """A Serve response / response generator that raises `error` when awaited or read."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __await__(self) -> Any:
        raise self.error
        yield  # pragma: no cover

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        raise self.error

    def cancel(self) -> None:
        pass


class FakeExpert:
    def __init__(self, error: Exception) -> None:
        self.generate = Method(lambda _request: Responses(error))
        self.stream = Method(lambda _request: Responses(error))

    def options(self, **_options: Any) -> FakeExpert:
        return self


def test_an_experts_context_length_refusal_is_unwrapped() -> None:
    wrapped = as_serve_raises_it(REFUSAL)
    assert isinstance(wrapped, ContextLengthExceeded) and str(wrapped) != REFUSAL.message
    backend = HandleBackend(FakeRouter(), {"math": FakeExpert(wrapped)})  # type: ignore[arg-type,dict-item]

    async def first_chunk() -> Any:
        return await anext(aiter(backend.stream("math", REQUEST)))

    for call in (backend.generate("math", REQUEST), first_chunk()):
        with pytest.raises(ContextLengthExceeded) as refused:
            asyncio.run(call)
        assert type(refused.value) is ContextLengthExceeded
        assert str(refused.value) == refused.value.message == REFUSAL.message
