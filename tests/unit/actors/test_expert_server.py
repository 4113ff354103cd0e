from __future__ import annotations

import asyncio
import threading
import time

import pytest

from actors.async_stream import iterate_in_thread
from actors.engines.base import Cancellation, ChatMessage, GenerationRequest
from actors.expert_server import ExpertServer
from tests.unit.fakes import EchoEngine

ASK = GenerationRequest((ChatMessage("user", "hi"),), max_tokens=4)


def test_system_prompt_is_prepended_unless_client_sends_one() -> None:
    server = ExpertServer("e", EchoEngine(), system_prompt="Be a pirate.")
    assert server.generate(ASK).text == "system:Be a pirate. | user:hi"
    own = GenerationRequest((ChatMessage("system", "Be brief."), *ASK.messages), max_tokens=4)
    assert server.generate(own).text == "system:Be brief. | user:hi"
    assert "".join(c.text for c in server.stream(ASK)) == "system:Be a pirate. | user:hi"
    assert server.requests == 3


def test_warm_up_is_one_token_and_not_counted() -> None:
    engine = EchoEngine()
    server = ExpertServer("e", engine)
    server.warm_up()
    assert [r.max_tokens for r in engine.requests] == [1]
    assert server.requests == 0


def test_iterate_in_thread_cancels_an_abandoned_stream() -> None:
    seen: list[Cancellation] = []

    def endless(cancellation: Cancellation):  # type: ignore[no-untyped-def]
        seen.append(cancellation)
        count = 0
        while not cancellation.cancelled:
            count += 1
            yield count

    async def consume_two() -> list[int]:
        got = []
        stream = iterate_in_thread(endless)
        async for item in stream:
            got.append(item)
            if len(got) == 2:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        return got

    assert asyncio.run(consume_two()) == [1, 2]
    assert seen[0].cancelled


def test_iterate_in_thread_reraises_producer_errors() -> None:
    def broken(cancellation: Cancellation):  # type: ignore[no-untyped-def]
        yield 1
        raise RuntimeError("device lost")

    async def consume() -> list[int]:
        return [item async for item in iterate_in_thread(broken)]

    with pytest.raises(RuntimeError, match="device lost"):
        asyncio.run(consume())


def test_a_producer_outliving_its_event_loop_ends_quietly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class SlowToClose:
        """Fails, then cleans up for a while: the consumer's loop is closed by then."""

        def __init__(self, cancellation: Cancellation) -> None:
            self.sent = False

        def __iter__(self) -> SlowToClose:
            return self

        def __next__(self) -> int:
            if self.sent:
                raise RuntimeError("device lost")
            self.sent = True
            return 1

        def close(self) -> None:
            time.sleep(0.3)

    async def consume() -> list[int]:
        return [item async for item in iterate_in_thread(SlowToClose)]

    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    with pytest.raises(RuntimeError, match="device lost"):
        asyncio.run(consume())  # the loop closes while the producer still delivers
    for thread in threading.enumerate():
        if thread.name == "token-stream":
            thread.join(timeout=5)
    assert errors == []


@pytest.mark.parametrize(
    ("temperature", "samples"),
    [(0.0, False), (5e-324, False), (1e-7, False), (1e-6, True), (0.7, True)],
)
def test_only_a_usable_temperature_samples(temperature: float, samples: bool) -> None:
    request = GenerationRequest((ChatMessage("user", "hi"),), 4, temperature=temperature)
    assert request.samples is samples
