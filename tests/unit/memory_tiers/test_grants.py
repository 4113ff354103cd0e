"""The grant ledger: who holds which lease and slot, and taking a dead holder's back."""

from __future__ import annotations

import pytest

from memory_tiers.arena import Region
from memory_tiers.grants import GrantLedger
from memory_tiers.hbm import Lease


def _lease(lease_id: int, expert: str = "e") -> Lease:
    return Lease(lease_id, expert, "cpu0", Region(0, 64), 1, needs_copy=False)


def test_settled_grants_leave_the_ledger_and_their_holder_with_the_last() -> None:
    ledger = GrantLedger()
    ledger.record("a", "contact-a", _lease(1), slot=1)
    ledger.record("a", "contact-a", _lease(2), slot=2)
    assert ledger.contacts() == {"a": "contact-a"}
    settled = ledger.settle(1)
    assert settled is not None and settled.slot == 1
    assert ledger.contacts() == {"a": "contact-a"}  # still holds lease 2
    assert ledger.settle(2) is not None
    assert ledger.contacts() == {} and ledger.outstanding() == 0
    assert ledger.settle(2) is None  # twice: nothing to settle
    assert ledger.reclaimed == 0


def test_reclaim_takes_only_the_dead_holders_grants() -> None:
    ledger = GrantLedger()
    ledger.record("dead", "d", _lease(1, "x"), slot=1)
    ledger.record("alive", "l", _lease(2, "y"), slot=2)
    ledger.record("dead", "d", _lease(3, "z"), slot=3)
    taken = ledger.reclaim("dead")
    assert [(h.lease.lease_id, h.slot) for h in taken] == [(1, 1), (3, 3)]
    assert ledger.reclaimed == 2
    assert ledger.contacts() == {"alive": "l"}
    assert [h.lease.lease_id for h in ledger.held_by("alive")] == [2]
    assert ledger.settle(1) is None  # a late release of a reclaimed grant finds nothing
    assert ledger.reclaim("dead") == []


def test_bad_records_are_refused_and_change_nothing() -> None:
    ledger = GrantLedger()
    with pytest.raises(ValueError, match="non-empty"):
        ledger.record("", None, _lease(1), slot=1)
    ledger.record("a", None, _lease(1), slot=1)
    with pytest.raises(ValueError, match="lease 1 of 'e' is already recorded"):
        ledger.record("b", None, _lease(1), slot=2)
    assert ledger.contacts() == {"a": None} and ledger.outstanding() == 1
