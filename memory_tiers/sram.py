"""The SRAM tier: a fixed number of active slots per device (experts executing at once).

``ActiveSlots(n)`` lets at most ``n`` holders run at once; the rest wait in arrival
order, each for at most ``wait_s`` seconds (``SlotWaitTimeout`` after that), so a
holder that hangs cannot keep every later request waiting for ever. Waiting is
measured (count, total, max, timeouts) because it is the cost of having fewer
slots than concurrent work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from memory_tiers.errors import SlotWaitTimeout
from memory_tiers.tier_stats import SlotStats


class ActiveSlots:
    """At most ``slots`` experts executing at once on one device (asyncio).

    ``wait_s`` bounds how long ``acquire`` waits for a slot; None waits as long as it takes.
    """

    def __init__(self, slots: int, wait_s: float | None = None) -> None:
        if slots < 1:
            raise ValueError(f"a device needs at least one active slot, got {slots}")
        if wait_s is not None and wait_s <= 0:
            raise ValueError(f"a slot wait bound must be positive, got {wait_s}")
        self.wait_s = wait_s
        self._semaphore = asyncio.Semaphore(slots)
        self._stats = SlotStats(slots=slots)
        self._holders: dict[int, str] = {}
        self._tokens = 0

    @property
    def slots(self) -> int:
        return self._stats.slots

    @property
    def active(self) -> int:
        return self._stats.active

    def holders(self) -> list[str]:
        """Experts executing right now."""
        return sorted(self._holders.values())

    def holds(self, token: int) -> bool:
        """Whether ``token`` is still held (not released, not taken back)."""
        return token in self._holders

    async def acquire(self, expert: str = "") -> int:
        """Wait (at most ``wait_s``) for a slot; returns a token for ``release``.

        Raises ``SlotWaitTimeout`` when no slot frees up in time.
        """
        started = time.perf_counter()
        waited = self._semaphore.locked()
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self.wait_s)
        except TimeoutError:
            self._stats.timeouts += 1
            raise SlotWaitTimeout(
                f"no active slot for expert {expert!r} within {self.wait_s:g} s: all "
                f"{self.slots} held by {self.holders()}"
            ) from None
        wait = time.perf_counter() - started
        stats = self._stats
        stats.acquisitions += 1
        stats.active += 1
        if waited:
            stats.waits += 1
        stats.wait_seconds_total += wait
        stats.wait_seconds_max = max(stats.wait_seconds_max, wait)
        self._tokens += 1
        self._holders[self._tokens] = expert
        return self._tokens

    def release(self, token: int) -> None:
        if token not in self._holders:
            raise ValueError(f"slot token {token} is not held (released twice?)")
        del self._holders[token]
        self._stats.active -= 1
        self._semaphore.release()

    @asynccontextmanager
    async def slot(self, expert: str = "") -> AsyncIterator[None]:
        """``async with slots.slot(expert):`` runs the body holding one slot."""
        token = await self.acquire(expert)
        try:
            yield
        finally:
            self.release(token)

    def stats(self) -> SlotStats:
        current = self._stats
        return SlotStats(
            slots=current.slots,
            active=current.active,
            acquisitions=current.acquisitions,
            waits=current.waits,
            wait_seconds_total=current.wait_seconds_total,
            wait_seconds_max=current.wait_seconds_max,
            timeouts=current.timeouts,
        )
