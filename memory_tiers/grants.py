"""Grants and who holds them: what a replica gets per request, and the books to take it back.

A grant (`Grant`) is an HBM lease plus an active slot, taken by an expert replica for
one request and given back when the request ends. A replica that dies mid-request never
gives it back: its lease keeps the expert in use (never evicted) and its slot stays
taken, so a few such deaths would block the device for good; a replica that hangs
(alive but stopped) would do the same. The ledger records every grant under its
holder, with the time it expires, so the service can end a dead holder's grants and
any grant past its deadline.

Liveness itself is not decided here (the grant service asks a probe the cluster
injects); `GrantLedger` only keeps the books. Not thread-safe: the grant service
calls it from its event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memory_tiers.device_memory import ArenaShare
from memory_tiers.hbm import Lease


@dataclass(frozen=True)
class Grant:
    """What the placement service hands an expert replica for one request.

    `incarnation` names the placement service's lifetime: generations restart with
    it, so a binding is only reused when both match. `expires_at` (seconds since the
    epoch, `time.time()`; None: no deadline) is when the service takes the grant back
    if it was not given back before: the holder must stop using the bytes by then.
    """

    lease: Lease
    slot: int
    incarnation: str
    slot_wait_s: float
    expires_at: float | None = None
    # On a zero-copy device: the expert's DDR object (what the holder binds to);
    # None where the bytes are in the device arena at `lease.region`.
    source: Any = None
    # On a GPU: how to map the arena holding `lease.region` (a restarted placement
    # service allocates a new one, which the holder maps before binding).
    arena: ArenaShare | None = None


@dataclass(frozen=True)
class HeldGrant:
    """One outstanding grant: ``holder``'s ``lease`` and slot token ``slot``, until
    ``expires_at`` (None: until given back or its holder dies)."""

    holder: str
    lease: Lease
    slot: int
    expires_at: float | None = None


class GrantLedger:
    """Outstanding grants by holder; a holder's contact is what a liveness check needs."""

    def __init__(self) -> None:
        self._by_lease: dict[int, HeldGrant] = {}
        self._contacts: dict[str, Any] = {}
        self.reclaimed = 0  # taken back from dead holders
        self.expired = 0  # taken back at their deadline

    def record(
        self, holder: str, contact: Any, lease: Lease, slot: int, expires_at: float | None = None
    ) -> HeldGrant:
        """Note that ``holder`` (reachable through ``contact``) now holds ``lease``/``slot``
        until ``expires_at`` at the latest."""
        if not holder:
            raise ValueError("a grant holder needs a non-empty id")
        if lease.lease_id in self._by_lease:
            raise ValueError(f"lease {lease.lease_id} of {lease.expert!r} is already recorded")
        held = HeldGrant(holder, lease, slot, expires_at)
        self._by_lease[lease.lease_id] = held
        self._contacts[holder] = contact
        return held

    def settle(self, lease_id: int) -> HeldGrant | None:
        """The holder gave the grant back; None when it was not recorded (or reclaimed)."""
        held = self._by_lease.pop(lease_id, None)
        if held is not None and not self._holds_any(held.holder):
            self._contacts.pop(held.holder, None)
        return held

    def reclaim(self, holder: str) -> list[HeldGrant]:
        """Remove and return every grant ``holder`` holds (it died); the caller ends them."""
        taken = [held for held in self._by_lease.values() if held.holder == holder]
        for held in taken:
            del self._by_lease[held.lease.lease_id]
        self._contacts.pop(holder, None)
        self.reclaimed += len(taken)
        return sorted(taken, key=lambda held: held.lease.lease_id)

    def expire(self, now: float) -> list[HeldGrant]:
        """Remove and return every grant whose deadline is ``now`` or earlier; the caller
        ends them. A holder keeps its contact while it holds other grants."""
        taken = [
            held
            for held in self._by_lease.values()
            if held.expires_at is not None and held.expires_at <= now
        ]
        for held in taken:
            self.settle(held.lease.lease_id)
        self.expired += len(taken)
        return sorted(taken, key=lambda held: held.lease.lease_id)

    def contacts(self) -> dict[str, Any]:
        """Holders with outstanding grants, and how to reach each."""
        return dict(self._contacts)

    def outstanding(self) -> int:
        return len(self._by_lease)

    def held_by(self, holder: str) -> list[HeldGrant]:
        return sorted(
            (held for held in self._by_lease.values() if held.holder == holder),
            key=lambda held: held.lease.lease_id,
        )

    def _holds_any(self, holder: str) -> bool:
        return any(held.holder == holder for held in self._by_lease.values())
