"""Active slots: at most n experts execute at once; waiting is measured."""

from __future__ import annotations

import asyncio

import pytest

from memory_tiers.errors import SlotWaitTimeout
from memory_tiers.sram import ActiveSlots


def test_at_most_n_holders_run_at_once_and_waits_are_counted() -> None:
    async def scenario() -> tuple[int, ActiveSlots]:
        slots = ActiveSlots(2)
        running = 0
        peak = 0

        async def work(expert: str) -> None:
            nonlocal running, peak
            async with slots.slot(expert):
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0.01)
                running -= 1

        await asyncio.gather(*(work(f"e{i}") for i in range(5)))
        return peak, slots

    peak, slots = asyncio.run(scenario())
    stats = slots.stats()
    assert peak == 2
    assert stats.acquisitions == 5 and stats.waits == 3 and stats.active == 0
    assert stats.wait_seconds_max > 0 and stats.wait_seconds_total >= stats.wait_seconds_max


def test_holders_are_listed_while_they_run() -> None:
    async def scenario() -> list[str]:
        slots = ActiveSlots(1)
        async with slots.slot("math"):
            return slots.holders()

    assert asyncio.run(scenario()) == ["math"]


def test_a_slot_is_released_when_the_body_fails() -> None:
    async def scenario() -> ActiveSlots:
        slots = ActiveSlots(1)
        with pytest.raises(RuntimeError):
            async with slots.slot("x"):
                raise RuntimeError("boom")
        async with slots.slot("y"):
            pass
        return slots

    slots = asyncio.run(scenario())
    assert slots.active == 0 and slots.stats().waits == 0


def test_bad_slot_counts_and_double_release_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ActiveSlots(0)

    async def scenario() -> None:
        slots = ActiveSlots(1)
        token = await slots.acquire("x")
        slots.release(token)
        with pytest.raises(ValueError, match="not held"):
            slots.release(token)

    asyncio.run(scenario())


def test_a_wait_for_a_slot_is_bounded_and_names_the_holders() -> None:
    """A holder that never lets go (a hung replica) must not make every later request
    wait for ever: the wait ends with SlotWaitTimeout, and the slots stay consistent."""

    async def scenario() -> ActiveSlots:
        slots = ActiveSlots(1, wait_s=0.05)
        token = await slots.acquire("hung")
        with pytest.raises(SlotWaitTimeout, match=r"'next'.*0\.05 s.*\['hung'\]"):
            await slots.acquire("next")
        assert slots.holds(token) and slots.active == 1
        slots.release(token)
        assert not slots.holds(token)
        await asyncio.wait_for(slots.acquire("next"), 1)
        return slots

    stats = asyncio.run(scenario()).stats()
    assert stats.timeouts == 1 and stats.acquisitions == 2 and stats.active == 1
    with pytest.raises(ValueError, match="positive"):
        ActiveSlots(1, wait_s=0)
