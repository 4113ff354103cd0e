"""HBM cache: leases, eviction by policy, pinning, accounting invariants, restore."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_tiers.arena import Region
from memory_tiers.errors import (
    BudgetExceeded,
    ExpertTooLarge,
    LeaseError,
    NotResident,
    PinnedOverBudget,
)
from memory_tiers.hbm import HBMCache, Lease

UNIT = 256  # one aligned region


def _use(cache: HBMCache, expert: str, now: float, nbytes: int = UNIT) -> Lease:
    """A complete request: acquire, copy done, release."""
    lease = cache.acquire(expert, nbytes, now)
    if lease.needs_copy:
        cache.mark_ready(lease, 0.001)
    cache.release(lease)
    return lease


def test_lru_cache_evicts_the_least_recently_used_idle_expert() -> None:
    cache = HBMCache("d0", 3 * UNIT, "lru")
    for now, expert in enumerate(["a", "b", "c"]):
        _use(cache, expert, now)
    _use(cache, "a", 3)  # a is now the most recent
    lease = _use(cache, "d", 4)
    assert lease.needs_copy and lease.evicted == ("b",)
    assert cache.residents() == ["a", "c", "d"]
    assert (cache.counters.hits, cache.counters.misses, cache.counters.evictions) == (1, 4, 1)
    assert cache.counters.switches == 4 and cache.counters.bytes_moved == 4 * UNIT


def test_lfu_cache_evicts_the_least_frequently_used_idle_expert() -> None:
    cache = HBMCache("d0", 3 * UNIT, "lfu")
    for now, expert in enumerate(["a", "a", "b", "c", "c", "b", "a"]):
        _use(cache, expert, now)
    # counts a=3, b=2, c=2; b and c tie, c was used longer ago (t=4 vs t=5).
    assert _use(cache, "d", 10).evicted == ("c",)
    assert cache.residents() == ["a", "b", "d"]


def test_an_expert_in_use_is_never_evicted() -> None:
    cache = HBMCache("d0", 2 * UNIT, "lru")
    held = cache.acquire("a", UNIT, 0)
    cache.mark_ready(held, 0.001)
    _use(cache, "b", 1)
    lease = _use(cache, "c", 2)  # a is older but in use: b goes
    assert lease.evicted == ("b",)
    assert cache.is_resident("a")
    cache.release(held)


def test_no_room_when_everything_is_in_use_changes_nothing() -> None:
    cache = HBMCache("d0", 2 * UNIT, "lru")
    a = cache.acquire("a", UNIT, 0)
    b = cache.acquire("b", UNIT, 1)
    before = cache.snapshot()
    with pytest.raises(BudgetExceeded, match=r"'c'.*\['a', 'b'\]"):
        cache.acquire("c", UNIT, 2)
    assert cache.snapshot() == before
    cache.release(a)
    cache.release(b)


def test_an_expert_larger_than_the_budget_is_a_clear_error() -> None:
    cache = HBMCache("d0", 2 * UNIT)
    with pytest.raises(ExpertTooLarge, match=r"'huge' needs 1000 bytes.*'d0'.*512"):
        cache.acquire("huge", 1000, 0)
    with pytest.raises(ExpertTooLarge, match="budget"):
        HBMCache("d1", 100)


def test_pinned_experts_never_leave() -> None:
    cache = HBMCache("d0", 3 * UNIT, "lru")
    _use(cache, "p", 0)
    cache.check_pinnable("p", UNIT)
    cache.pin("p")
    for now, expert in enumerate(["a", "b", "c", "d", "e", "a"], start=1):
        _use(cache, expert, now)
        assert cache.is_resident("p")
    with pytest.raises(BudgetExceeded, match="pinned"):
        cache.evict("p")
    cache.unpin("p")
    cache.evict("p")
    assert not cache.is_resident("p")


def test_pinning_more_than_the_budget_is_a_clear_error() -> None:
    cache = HBMCache("d0", 2 * UNIT)
    _use(cache, "a", 0)
    cache.pin("a")
    _use(cache, "b", 1)
    cache.pin("b")
    with pytest.raises(PinnedOverBudget, match=r"'c'.*\['a', 'b'\]"):
        cache.check_pinnable("c", UNIT)
    with pytest.raises(NotResident, match="'c'"):
        cache.pin("c")


def test_releasing_twice_or_a_stale_lease_is_refused() -> None:
    cache = HBMCache("d0", 1 * UNIT)
    lease = _use(cache, "a", 0)
    with pytest.raises(LeaseError, match="not outstanding"):
        cache.release(lease)
    _use(cache, "b", 1)  # evicts a
    _use(cache, "a", 2)  # a again, new generation
    assert cache.resident("a") is not None
    with pytest.raises(LeaseError):
        cache.release(lease)


def test_each_admission_gets_a_new_generation() -> None:
    cache = HBMCache("d0", 1 * UNIT)
    first = _use(cache, "a", 0)
    hit = _use(cache, "a", 1)
    _use(cache, "b", 2)
    again = _use(cache, "a", 3)
    assert hit.generation == first.generation and not hit.needs_copy
    assert again.generation > first.generation and again.needs_copy


def test_abort_drops_the_resident_and_frees_its_region() -> None:
    cache = HBMCache("d0", 2 * UNIT)
    lease = cache.acquire("a", UNIT, 0)
    cache.acquire("a", UNIT, 0)  # a second holder waiting for the copy
    assert len(cache.abort(lease)) == 2
    assert not cache.is_resident("a") and cache.used_bytes == 0
    assert cache.counters.failed_switches == 1


def test_only_victims_overlapping_the_chosen_hole_are_evicted() -> None:
    cache = HBMCache("d0", 4 * UNIT, "lru")
    for now, expert in enumerate(["a", "b", "c", "d"]):
        _use(cache, expert, now)
    cache.evict("b")  # hole at [UNIT, 2 UNIT)
    lease = _use(cache, "big", 10, nbytes=2 * UNIT)
    # LRU order is a, c, d; freeing a (at 0) joins the hole: c and d stay.
    assert lease.evicted == ("a",) and lease.region.offset == 0
    assert cache.residents() == ["big", "c", "d"]
    cache.check_invariants()


def test_prefetch_admission_counts_as_one_access_with_its_request() -> None:
    cache = HBMCache("d0", 2 * UNIT, "lfu")
    lease = cache.acquire("a", UNIT, 0, purpose="prefetch")
    cache.mark_ready(lease, 0.001)
    cache.release(lease)
    _use(cache, "a", 1)  # the request the prefetch was for: a hit
    _use(cache, "b", 2)
    _use(cache, "b", 3)
    assert cache.counters.prefetches == 1 and cache.counters.hits == 2
    assert cache.policy.victim_order(["a", "b"], {}, {}, 4) == ["a", "b"]


def test_restore_recreates_residents_with_their_leases() -> None:
    cache = HBMCache("d0", 4 * UNIT)
    cache.restore("a", Region(2 * UNIT, UNIT), generation=7, lease_ids=[41], pinned=True)
    info = cache.resident("a")
    assert info is not None and (info.generation, info.in_use, info.pinned) == (7, 1, True)
    cache.release(Lease(41, "a", "d0", Region(2 * UNIT, UNIT), 7, needs_copy=False))
    fresh = _use(cache, "b", 0)
    assert fresh.generation == 8 and fresh.lease_id > 41
    with pytest.raises(ValueError, match="already resident"):
        cache.restore("a", Region(0, UNIT), generation=9)


# -- accounting under random sequences ------------------------------------------------

_EXPERTS = {name: size for name, size in zip("abcdefgh", [1, 1, 2, 3, 1, 2, 4, 1], strict=True)}
_ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "release", "ready", "pin", "unpin", "evict", "abort"]),
        st.sampled_from(sorted(_EXPERTS)),
        st.integers(0, 50),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, policy=st.sampled_from(["lru", "lfu", "cost_aware"]))
def test_lease_accounting_is_never_over_budget_or_negative(
    ops: list[tuple[str, str, int]], policy: str
) -> None:
    budget = 6 * UNIT
    cache = HBMCache("d0", budget, policy)
    held: list[Lease] = []
    pinned: set[str] = set()
    for step, (op, expert, pick) in enumerate(ops):
        nbytes = _EXPERTS[expert] * UNIT - 17
        in_use_before = {lease.expert: lease.region for lease in held}
        if op == "acquire":
            try:
                lease = cache.acquire(expert, nbytes, float(step))
            except BudgetExceeded:
                pass
            else:
                held.append(lease)
                assert not set(lease.evicted) & (set(in_use_before) | pinned)
        elif op in ("release", "ready", "abort") and held:
            lease = held[pick % len(held)]
            if op == "release":
                cache.release(held.pop(pick % len(held)))
            elif op == "ready" and not cache.is_ready(lease.expert, lease.generation):
                cache.mark_ready(lease, 0.001)
            elif op == "abort" and not cache.is_ready(lease.expert, lease.generation):
                cancelled = set(cache.abort(lease))
                held = [h for h in held if h.lease_id not in cancelled]
                pinned.discard(lease.expert)
        elif op == "pin" and cache.is_resident(expert):
            try:
                cache.check_pinnable(expert, nbytes)
            except PinnedOverBudget:
                pass
            else:
                cache.pin(expert)
                pinned.add(expert)
        elif op == "unpin":
            cache.unpin(expert)
            pinned.discard(expert)
        elif op == "evict" and cache.is_resident(expert):
            try:
                cache.evict(expert)
            except BudgetExceeded:
                assert expert in pinned or expert in in_use_before
        cache.check_invariants()
        assert 0 <= cache.used_bytes <= budget
        assert cache.pinned_bytes() <= budget
        for name, region in in_use_before.items():
            if any(h.expert == name for h in held):
                info = cache.resident(name)
                assert info is not None and info.offset == region.offset
        for name in pinned:
            assert cache.is_resident(name)
        for lease in held:
            info = cache.resident(lease.expert)
            assert info is not None and info.in_use >= 1


def test_a_retired_idle_expert_is_evicted_at_once() -> None:
    cache = HBMCache("d0", 2 * UNIT, "lru")
    _use(cache, "a", 0)
    cache.pin("a")
    assert cache.retire("a") is True
    assert cache.residents() == [] and cache.used_bytes == 0
    assert cache.retire("never-resident") is True


def test_a_retired_leased_expert_keeps_its_bytes_until_its_last_lease_ends() -> None:
    cache = HBMCache("d0", 2 * UNIT, "lru")
    old = cache.acquire("a", UNIT, 0)
    cache.mark_ready(old, 0.001)
    second = cache.acquire("a", UNIT, 1)
    assert cache.retire("a") is False  # its new bytes must not be found in the old place
    fresh = cache.acquire("a", UNIT, 2)
    assert fresh.needs_copy and fresh.region != old.region
    assert fresh.generation != old.generation
    cache.mark_ready(fresh, 0.001)
    cache.check_invariants()
    assert cache.in_use() and cache.used_bytes == 2 * UNIT
    with pytest.raises(BudgetExceeded):  # the retired bytes still hold their room
        cache.acquire("b", UNIT, 3)
    cache.release(old)
    cache.release(second)  # the last holder of the old bytes: they go now
    with pytest.raises(LeaseError):
        cache.release(second)
    cache.release(fresh)
    cache.check_invariants()
    assert cache.residents() == ["a"] and cache.used_bytes == UNIT
    assert _use(cache, "b", 4).needs_copy  # the room the old bytes held is free again
