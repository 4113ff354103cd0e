"""Grants and who holds them: what a replica gets per request, and the books to take it back.

A grant (`Grant`) is an HBM lease plus an active slot, taken by an expert replica for
one request and given back when the request ends. A replica that dies mid-request never
gives it back: its lease keeps the expert in use (never evicted) and its slot stays
taken, so a few such deaths would block the device for good. The ledger records every
grant under its holder, so the service can find a dead holder's grants and end them.

Liveness itself is not decided here (the grant service asks a probe the cluster
injects); `GrantLedger` only keeps the books. Not thread-safe: the grant service
calls it from its event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memory_tiers.hbm import Lease


@dataclass(frozen=True)
class Grant:
    """What the placement service hands an expert replica for one request.

    `incarnation` names the placement service's lifetime: generations restart with
    it, so a binding is only reused when both match.
    """

    lease: Lease
    slot: int
    incarnation: str
    slot_wait_s: float


@dataclass(frozen=True)
class HeldGrant:
    """One outstanding grant: ``holder``'s ``lease`` and slot token ``slot``."""

    holder: str
    lease: Lease
    slot: int


class GrantLedger:
    """Outstanding grants by holder; a holder's contact is what a liveness check needs."""

    def __init__(self) -> None:
        self._by_lease: dict[int, HeldGrant] = {}
        self._contacts: dict[str, Any] = {}
        self.reclaimed = 0

    def record(self, holder: str, contact: Any, lease: Lease, slot: int) -> HeldGrant:
        """Note that ``holder`` (reachable through ``contact``) now holds ``lease``/``slot``."""
        if not holder:
            raise ValueError("a grant holder needs a non-empty id")
        if lease.lease_id in self._by_lease:
            raise ValueError(f"lease {lease.lease_id} of {lease.expert!r} is already recorded")
        held = HeldGrant(holder, lease, slot)
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
