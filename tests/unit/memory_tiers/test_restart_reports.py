"""Residency reports after a placement restart: answered once, never losing a release."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from memory_tiers.grant_service import GrantService
from memory_tiers.grants import Grant
from memory_tiers.placement import ResidencyReport
from tests.unit.memory_tiers.test_grant_service import DEVICE, _Clock, _grants, _in_use


def _restarted(tmp_path: Path, **options: object) -> tuple[GrantService, Grant, GrantService]:
    """A first incarnation that granted "a" to a replica, and the second one, started on
    the same arena file while that grant is still held."""
    first = _grants(tmp_path)
    held = asyncio.run(first.acquire("a", "replica-1", "contact-1"))
    first.placement.close()
    second = _grants(tmp_path, restart_grace_s=0.0, **options)  # type: ignore[arg-type]
    assert second.restarted
    return first, held, second


def _report_of(grant: Grant, in_use: bool) -> ResidencyReport:
    lease = grant.lease
    return ResidencyReport(
        lease.expert,
        lease.device,
        lease.region.offset,
        lease.region.nbytes,
        lease.generation,
        (lease.lease_id,) if in_use else (),
    )


def _count_comparisons(grants: GrantService) -> list[ResidencyReport]:
    compared: list[ResidencyReport] = []
    check = grants._holds_expert_bytes

    def counting(report: ResidencyReport) -> bool:
        compared.append(report)
        return check(report)

    grants._holds_expert_bytes = counting  # type: ignore[method-assign]
    return compared


def test_a_repeated_report_is_answered_without_comparing_the_bytes_again(
    tmp_path: Path,
) -> None:
    first, held, second = _restarted(tmp_path)
    compared = _count_comparisons(second)
    accepted = _report_of(held, in_use=False)
    wrong_size = ResidencyReport("b", DEVICE, 0, 7, 1)

    async def scenario() -> list[str]:
        verdicts = []
        for _ in range(5):  # an idle replica reports every second
            verdicts.append(await second.report(accepted, first.incarnation))
            verdicts.append(await second.report(wrong_size, first.incarnation))
        return verdicts

    verdicts = asyncio.run(scenario())
    assert verdicts[:2] == ["accepted", "refused"]
    assert set(verdicts[2::2]) == {"accepted"} and set(verdicts[3::2]) == {"refused"}
    assert compared == [accepted, wrong_size]  # each binding judged once, not five times
    assert second.refused_reports == 1  # one binding refused, however often it is reported


def test_reports_of_the_running_incarnation_are_current_and_cost_nothing(
    tmp_path: Path,
) -> None:
    grants = _grants(tmp_path)
    compared = _count_comparisons(grants)

    async def scenario() -> str:
        grant = await grants.acquire("a", "replica-1", "contact-1")
        grants.release(grant)
        return await grants.report(_report_of(grant, in_use=False), grants.incarnation)

    assert asyncio.run(scenario()) == "current"
    assert compared == []


def test_a_release_that_arrives_while_its_report_is_checked_is_not_lost(
    tmp_path: Path,
) -> None:
    first, held, second = _restarted(tmp_path)
    comparing, go_on = threading.Event(), threading.Event()
    check = second._holds_expert_bytes

    def slow(report: ResidencyReport) -> bool:
        comparing.set()
        go_on.wait(10)
        return check(report)

    second._holds_expert_bytes = slow  # type: ignore[method-assign]

    async def scenario() -> str:
        checking = asyncio.create_task(second.report(_report_of(held, True), first.incarnation))
        await asyncio.to_thread(comparing.wait, 10)
        second.release(held)  # the request ended while its report was being checked
        go_on.set()
        return await checking

    assert asyncio.run(scenario()) == "accepted"
    assert _in_use(second) == {"a": 0}  # no lease left that nobody holds: "a" can go
    second.placement.evict("a", DEVICE)


def test_a_restored_lease_nobody_gives_back_ends_at_the_request_deadline(
    tmp_path: Path,
) -> None:
    clock = _Clock()
    first, held, second = _restarted(tmp_path, grant_lifetime_s=30.0, clock=clock)

    async def scenario() -> None:
        assert await second.report(_report_of(held, True), first.incarnation) == "accepted"
        assert _in_use(second) == {"a": 1}
        clock.now += 29
        assert second.reclaim_expired() == 0 and _in_use(second) == {"a": 1}
        clock.now += 2  # its holder died or hung after the restart: nobody gives it back
        assert second.reclaim_expired() == 1
        assert _in_use(second) == {"a": 0}
        assert second.release(held) is False  # a late release changes nothing

    asyncio.run(scenario())
    assert _in_use(second) == {"a": 0}


def test_a_restored_lease_given_back_in_time_is_not_expired_later(tmp_path: Path) -> None:
    clock = _Clock()
    first, held, second = _restarted(tmp_path, grant_lifetime_s=30.0, clock=clock)

    async def scenario() -> None:
        await second.report(_report_of(held, True), first.incarnation)
        assert second.release(held) is True
        grant = await second.acquire("a", "replica-2", "contact-2")  # a new lease on "a"
        clock.now += 31
        # Only the new grant is past its deadline now; the restored lease ended already.
        assert second.reclaim_expired() == 1
        assert second.release(grant) is False

    asyncio.run(scenario())
    assert _in_use(second) == {"a": 0}
