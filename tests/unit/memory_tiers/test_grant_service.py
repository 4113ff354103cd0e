"""The grant service with fakes: grants, unavailable experts, restart reports, dead holders."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memory_tiers.ddr import CallableSource, InProcessObjectStore
from memory_tiers.errors import ExpertUnavailable, SlotWaitTimeout, UnknownExpert
from memory_tiers.grant_service import GrantService, arena_survived
from memory_tiers.grants import Grant
from memory_tiers.packing import TensorEntry, TensorIndex
from memory_tiers.placement import DeviceSpec, ResidencyReport

NBYTES = 4096
DEVICE = "host0"


def _bytes(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, NBYTES, dtype=np.uint8)


def _source(seed: int) -> CallableSource:
    index = TensorIndex((TensorEntry("w", "uint8", (NBYTES,), 0, NBYTES),), NBYTES)
    return CallableSource(lambda: (_bytes(seed), index), f"seed {seed}")


def _torn_source() -> CallableSource:
    def build() -> Any:
        raise ValueError("the file ends too early")

    return CallableSource(build, "torn")


class _Verdicts:
    """A liveness probe whose answers the test sets: contact -> dead?"""

    def __init__(self) -> None:
        self.dead: set[str] = set()
        self.asked: list[str] = []
        self.failures = 0  # raise this many times before answering

    async def __call__(self, contact: Any) -> bool:
        self.asked.append(contact)
        if self.failures:
            self.failures -= 1
            raise RuntimeError("the probe broke")
        return contact in self.dead


def _spec(tmp_path: Path) -> DeviceSpec:
    return DeviceSpec(DEVICE, 3 * NBYTES, arena="file", arena_path=tmp_path / "host0.arena")


def _grants(
    tmp_path: Path,
    probe: _Verdicts | None = None,
    *,
    experts: Sequence[str] = ("a", "b", "c"),
    pinned: Sequence[str] = (),
    **options: Any,
) -> GrantService:
    grants = GrantService(
        _spec(tmp_path),
        InProcessObjectStore(),
        is_dead=probe or _Verdicts(),
        active_slots=2,
        pinned=pinned,
        **options,
    )
    for seed, name in enumerate(experts):
        grants.register(name, _source(seed), f"source {seed}")
    grants.start()
    return grants


def _in_use(grants: GrantService) -> dict[str, int]:
    return {r["expert"]: r["in_use"] for r in grants.residency()[DEVICE]["residents"]}


def test_a_grant_pairs_an_active_slot_with_a_lease(tmp_path: Path) -> None:
    grants = _grants(tmp_path)

    async def scenario() -> Grant:
        return await grants.acquire("a")

    grant = asyncio.run(scenario())
    assert grant.lease.expert == "a" and grant.lease.device == DEVICE
    assert grant.incarnation == grants.incarnation and grant.slot_wait_s >= 0
    assert grants.slots.active == 1 and _in_use(grants) == {"a": 1}
    held = grants.placement.arena(DEVICE).host_view(grant.lease.region)
    assert np.array_equal(held, _bytes(0))
    grants.release(grant)
    assert grants.slots.active == 0 and _in_use(grants) == {"a": 0}


def test_a_lease_that_cannot_be_had_gives_its_slot_back(tmp_path: Path) -> None:
    grants = _grants(tmp_path)
    with pytest.raises(UnknownExpert, match="'nobody'"):
        asyncio.run(grants.acquire("nobody", "replica-1", "contact-1"))
    assert grants.slots.active == 0 and grants.ledger.outstanding() == 0


def test_a_dead_holders_lease_and_slot_are_reclaimed(tmp_path: Path) -> None:
    verdicts = _Verdicts()
    grants = _grants(tmp_path, verdicts)

    async def scenario() -> None:
        lost = await grants.acquire("a", "replica-1", "contact-1")
        kept = await grants.acquire("b", "replica-2", "contact-2")
        assert grants.slots.active == 2
        # Both slots taken: without reclaiming, a third request would wait for ever.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(grants.acquire("c", "replica-3", "contact-3"), 0.05)
        assert await grants.reclaim_dead_holders() == 0  # nobody died yet
        verdicts.dead.add("contact-1")
        assert await grants.reclaim_dead_holders() == 1
        metrics = grants.metrics()
        assert metrics["reclaimed_grants"] == 1 and metrics["outstanding_grants"] == 1
        assert _in_use(grants) == {"a": 0, "b": 1}
        third = await asyncio.wait_for(grants.acquire("c", "replica-3", "contact-3"), 5)
        grants.release(lost)  # a late release of a reclaimed grant is harmless
        grants.release(kept)
        grants.release(third)
        assert grants.slots.active == 0 and grants.metrics()["outstanding_grants"] == 0

    asyncio.run(scenario())


def test_the_watcher_reclaims_without_being_asked_and_stops_when_idle(tmp_path: Path) -> None:
    verdicts = _Verdicts()
    verdicts.dead.add("gone")
    grants = _grants(tmp_path, verdicts, holder_check_interval_s=0.01)

    async def scenario() -> None:
        await grants.acquire("a", "replica-1", "gone")
        await grants.acquire("a", "replica-1", "gone")
        for _ in range(500):
            if grants.ledger.outstanding() == 0:
                break
            await asyncio.sleep(0.01)
        assert grants.ledger.reclaimed == 2 and grants.slots.active == 0
        assert grants.holder_watch is not None
        await asyncio.wait_for(grants.holder_watch, 1)  # nothing outstanding: it ends

    asyncio.run(scenario())


def test_a_failed_check_is_retried_by_the_watcher(tmp_path: Path) -> None:
    verdicts = _Verdicts()
    verdicts.dead.add("gone")
    verdicts.failures = 2
    grants = _grants(tmp_path, verdicts, holder_check_interval_s=0.01)

    async def scenario() -> None:
        await grants.acquire("a", "replica-1", "gone")
        assert grants.holder_watch is not None
        await asyncio.wait_for(grants.holder_watch, 5)

    asyncio.run(scenario())
    assert verdicts.failures == 0 and len(verdicts.asked) == 3
    assert grants.ledger.reclaimed == 1 and grants.slots.active == 0


def test_grants_without_a_holder_are_not_tracked(tmp_path: Path) -> None:
    grants = _grants(tmp_path)
    grant = asyncio.run(grants.acquire("a"))
    assert grants.ledger.outstanding() == 0 and grants.holder_watch is None
    grants.release(grant)
    assert grants.slots.active == 0


def test_an_unpackable_expert_is_unavailable_and_the_others_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("tests.grant_service")
    grants = _grants(tmp_path, experts=("a", "b"), logger=logger)
    with caplog.at_level(logging.ERROR, logger="tests.grant_service"):
        assert grants.register("c", _torn_source(), "checkpoint /models/c") is None
    reason = (
        "expert 'c' is unavailable: its checkpoint /models/c could not be packed: "
        "ValueError: the file ends too early"
    )
    assert grants.broken == {"c": reason} and grants.metrics()["broken"] == {"c": reason}
    assert [record.getMessage() for record in caplog.records] == [f"placement: {reason}"]
    assert not grants.has_expert("c") and grants.placement.experts() == ["a", "b"]
    with pytest.raises(ExpertUnavailable, match="could not be packed"):
        grants.describe("c")
    with pytest.raises(ExpertUnavailable, match="expert 'c'"):
        asyncio.run(grants.acquire("c", "r", None))
    assert asyncio.run(grants.prefetch("c")) is False
    assert grants.slots.active == 0
    assert grants.describe("a")["index"]
    # Packed on a later try (a fixed checkpoint): available again.
    assert grants.register("c", _source(2), "checkpoint /models/c") is not None
    assert grants.broken == {} and grants.has_expert("c")


def test_pins_are_made_at_start_except_for_unavailable_experts(tmp_path: Path) -> None:
    grants = GrantService(
        _spec(tmp_path), InProcessObjectStore(), is_dead=_Verdicts(), pinned=("a", "c")
    )
    grants.register("a", _source(0), "source 0")
    grants.register("c", _torn_source(), "source 2")
    assert not grants.restarted
    grants.start()
    residents = grants.residency()[DEVICE]["residents"]
    assert [(r["expert"], r["pinned"]) for r in residents] == [("a", True)]
    assert grants.pinned == [] and grants.ready_at == 0.0


def test_describe_names_the_arena_file_and_the_tensor_index(tmp_path: Path) -> None:
    grants = _grants(tmp_path)
    described = grants.describe("b")
    assert described["device"] == DEVICE
    assert described["arena_path"] == str(tmp_path / "host0.arena")
    assert TensorIndex.from_json(described["index"]).total_bytes == NBYTES


def test_prefetch_pin_and_unpin_act_on_the_device(tmp_path: Path) -> None:
    grants = _grants(tmp_path)
    assert asyncio.run(grants.prefetch("a")) is True
    assert asyncio.run(grants.prefetch("a")) is False  # resident already
    grants.pin("b")
    pinned = {r["expert"]: r["pinned"] for r in grants.residency()[DEVICE]["residents"]}
    assert pinned == {"a": False, "b": True}
    grants.unpin("b")
    assert not any(r["pinned"] for r in grants.residency()[DEVICE]["residents"])


def test_metrics_add_grants_and_slots_to_the_placement_counters(tmp_path: Path) -> None:
    grants = _grants(tmp_path)
    metrics = grants.metrics()
    assert metrics["policy"] == "lru" and DEVICE in metrics["devices"]
    assert metrics["incarnation"] == grants.incarnation
    assert metrics["refused_reports"] == 0 and metrics["broken"] == {}
    assert metrics["outstanding_grants"] == 0 and metrics["reclaimed_grants"] == 0
    assert metrics["slots"]["slots"] == 2 and metrics["slots"]["active"] == 0


def test_only_a_file_arena_of_the_full_size_survives(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    assert not arena_survived(spec)  # no file yet
    assert spec.arena_path is not None
    spec.arena_path.write_bytes(b"\0" * (NBYTES - 1))
    assert not arena_survived(spec)  # another size: a fresh arena replaces it
    spec.arena_path.write_bytes(b"\0" * spec.budget_bytes)
    assert arena_survived(spec)
    assert not arena_survived(DeviceSpec(DEVICE, 3 * NBYTES))  # in memory: gone with us


def test_a_restart_accepts_only_reports_of_the_bytes_the_arena_still_holds(
    tmp_path: Path,
) -> None:
    first = _grants(tmp_path)
    assert not first.restarted
    held = asyncio.run(first.acquire("a", "replica-1", "contact-1"))  # across the restart
    first.placement.close()

    second = _grants(tmp_path, pinned=("b",), restart_grace_s=0.2)
    assert second.restarted and second.incarnation != first.incarnation
    assert second.ready_at > 0 and second.pinned == ["b"]  # pins wait for the reports
    lease = held.lease
    reported = ResidencyReport(
        "a", DEVICE, lease.region.offset, lease.region.nbytes, lease.generation, (lease.lease_id,)
    )

    async def scenario() -> None:
        # Not held by the arena: b was never switched in; a region beyond the arena; a size
        # that is not the expert's.
        refused = [
            ResidencyReport("b", DEVICE, 0, NBYTES, 1),
            ResidencyReport("a", DEVICE, 3 * NBYTES, NBYTES, 1),
            ResidencyReport("a", DEVICE, 0, NBYTES - 1, 1),
        ]
        for report in refused:
            assert await second.report(report, "old") == "refused"
        assert second.refused_reports == 3
        assert await second.report(reported, second.incarnation) == "current"  # its own
        assert await second.report(reported, first.incarnation) == "accepted"
        assert await second.report(reported, "older") == "known"  # resident already
        assert _in_use(second) == {"a": 1}
        # Requests wait out the grace; then the pinned expert is switched in.
        grant = await second.acquire("c")
        assert second.pinned == []
        second.release(grant)
        second.release(held)  # an earlier incarnation's grant: its lease ends, no slot
        assert second.slots.active == 0

    asyncio.run(scenario())
    residents = {r["expert"]: r for r in second.residency()[DEVICE]["residents"]}
    assert residents["a"]["in_use"] == 0 and residents["a"]["offset"] == lease.region.offset
    assert residents["b"]["pinned"] and residents["c"]["in_use"] == 0
    assert second.metrics()["refused_reports"] == 3


class _Clock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_wait_for_an_active_slot_is_bounded(tmp_path: Path) -> None:
    grants = _grants(tmp_path, slot_wait_s=0.05)

    async def scenario() -> None:
        first = await grants.acquire("a", "replica-1", "contact-1")
        second = await grants.acquire("b", "replica-2", "contact-2")
        with pytest.raises(SlotWaitTimeout, match="'c'"):
            await grants.acquire("c", "replica-3", "contact-3")
        assert grants.ledger.outstanding() == 2 and "c" not in _in_use(grants)
        assert grants.metrics()["slots"]["timeouts"] == 1
        grants.release(first)
        grants.release(second)

    asyncio.run(scenario())


def test_a_grant_past_its_deadline_is_taken_back_from_a_live_holder(tmp_path: Path) -> None:
    clock = _Clock()
    verdicts = _Verdicts()  # nobody dies: only the deadline ends the grant
    grants = _grants(tmp_path, verdicts, grant_lifetime_s=30.0, clock=clock)

    async def scenario() -> None:
        hung = await grants.acquire("a", "replica-1", "contact-1")
        assert hung.expires_at == clock.now + 30.0
        clock.now += 10.0
        kept = await grants.acquire("b", "replica-2", "contact-2")
        clock.now += 19.0
        assert grants.reclaim_expired() == 0
        clock.now += 1.0  # the first grant's deadline
        assert grants.reclaim_expired() == 1
        assert await grants.reclaim_dead_holders() == 0
        metrics = grants.metrics()
        assert metrics["expired_grants"] == 1 and metrics["reclaimed_grants"] == 0
        assert metrics["outstanding_grants"] == 1 and grants.slots.active == 1
        assert _in_use(grants) == {"a": 0, "b": 1}
        # The hung replica wakes up and gives back what it no longer holds: nothing changes.
        assert grants.release(hung) is False
        assert grants.slots.active == 1 and _in_use(grants) == {"a": 0, "b": 1}
        assert grants.release(kept) is True
        assert grants.slots.active == 0 and grants.ledger.outstanding() == 0

    asyncio.run(scenario())


def test_the_watcher_frees_a_hung_holders_slot_for_the_next_request(tmp_path: Path) -> None:
    """Both slots held by replicas that stay alive and never release: the third request
    gets a slot once their grants' deadline passes."""
    clock = _Clock()  # both deadlines pass at one moment, however slow the machine
    grants = _grants(tmp_path, grant_lifetime_s=30.0, holder_check_interval_s=0.01, clock=clock)

    async def later() -> None:
        await asyncio.sleep(0.1)
        clock.now += 31

    async def scenario() -> None:
        await grants.acquire("a", "replica-1", "contact-1")
        await grants.acquire("b", "replica-2", "contact-2")
        passing = asyncio.create_task(later())
        third = await asyncio.wait_for(grants.acquire("c", "replica-3", "contact-3"), 5)
        await passing
        assert grants.ledger.expired == 2 and grants.ledger.outstanding() == 1
        assert grants.release(third) is True

    asyncio.run(scenario())


def test_grants_without_a_holder_or_a_lifetime_have_no_deadline(tmp_path: Path) -> None:
    timed = _grants(tmp_path, grant_lifetime_s=5.0)
    grant = asyncio.run(timed.acquire("a"))
    assert grant.expires_at is None and timed.release(grant) is True
    (tmp_path / "other").mkdir()
    untimed = _grants(tmp_path / "other", experts=("a",))
    held = asyncio.run(untimed.acquire("a", "replica-1", "contact-1"))
    assert held.expires_at is None and untimed.release(held) is True
