"""What the scale benchmark measures: residency at send time, switch overhead, copy
bound, spills, process memory, and the answers the harness now keeps."""

from __future__ import annotations

import json
import time

import pytest

from benchmarks.harness.client import Outcome
from benchmarks.harness.driver import run_sync
from benchmarks.harness.memory import ProcessMemory, deployment_of, pss_split, replica_memory
from benchmarks.harness.workload import closed_loop
from benchmarks.scale_experts import ReferenceCheck
from benchmarks.scale_metrics import (
    ResidencyWatch,
    copy_bound_p50_s,
    copyto_bandwidth,
    counter_delta,
    parse_store_stats,
    residency_split,
    resident_flags,
)
from benchmarks.systems import Timeline
from cluster.config import ServeSettings
from cluster.ingress.http_api import build_http_app
from cluster.ingress.service import CoEService
from tests.unit.benchmarks.harness.test_driver import serve_in_thread
from tests.unit.fakes import FakeBackend


def outcome(index: int, expert: str, started_s: float, ttft_s: float, ok: bool = True) -> Outcome:
    return Outcome(
        index=index,
        expert=expert,
        stream=True,
        ok=ok,
        status=200 if ok else None,
        error_kind=None if ok else "timeout",
        started_s=started_s,
        ttft_s=ttft_s if ok else None,
        total_s=ttft_s + 0.1,
        tokens=8,
        served_by=expert,
    )


def watch_with(snapshots: list[tuple[float, set[str]]]) -> ResidencyWatch:
    watch = ResidencyWatch(lambda: [])
    watch.snapshots = [(t, frozenset(held)) for t, held in snapshots]
    return watch


def test_a_request_is_resident_when_the_last_answer_before_it_held_its_expert() -> None:
    watch = watch_with([(100.0, {"a"}), (100.5, {"a", "b"}), (101.0, {"b"})])
    outcomes = [
        outcome(0, "a", started_s=-1.0, ttft_s=0.1),  # before any answer: not known held
        outcome(1, "a", started_s=0.2, ttft_s=0.1),
        outcome(2, "b", started_s=0.4, ttft_s=0.5),  # b arrived at 100.5, after the send
        outcome(3, "b", started_s=0.5, ttft_s=0.1),  # an answer stamped at the send counts
        outcome(4, "a", started_s=5.0, ttft_s=0.6),
    ]
    assert resident_flags(outcomes, 100.0, watch) == [False, True, False, True, False]
    assert watch.held_at(99.0) is None and watch.held_at(100.7) == frozenset({"a", "b"})


def test_residency_watch_polls_until_stopped_and_survives_a_failed_poll() -> None:
    answers = iter([["a"], RuntimeError("gone"), ["a", "b"]])

    def resident() -> list[str]:
        answer = next(answers, ["b"])
        if isinstance(answer, Exception):
            raise answer
        return answer

    deadline = time.monotonic() + 10
    with ResidencyWatch(resident, interval_s=0.01) as watch:
        while len(watch.snapshots) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert watch.failures == 1
    assert [set(held) for _, held in watch.snapshots[:3]] == [{"a"}, {"a", "b"}, {"b"}]
    times = [t for t, _ in watch.snapshots]
    assert times == sorted(times)


def test_switch_overhead_is_the_gap_between_the_ttft_medians_and_failures_are_left_out() -> None:
    outcomes = [
        outcome(0, "a", 0.0, 0.10),
        outcome(1, "a", 0.0, 0.20),
        outcome(2, "b", 0.0, 0.50),
        outcome(3, "c", 0.0, 0.70),
        outcome(4, "c", 0.0, 9.00, ok=False),
    ]
    flags = [True, True, False, False, False]
    split = residency_split(outcomes, flags)
    assert split["resident"]["requests"] == 2 and split["nonresident"]["ok"] == 2
    assert split["nonresident"]["requests"] == 3
    assert split["switch_overhead_p50_s"] == pytest.approx(0.60 - 0.15)
    assert residency_split(outcomes[:2], flags[:2])["switch_overhead_p50_s"] is None
    sizes = {"a": 10, "b": 100, "c": 300}
    assert copy_bound_p50_s(outcomes, flags, sizes, 100.0) == pytest.approx(2.0)
    assert copy_bound_p50_s(outcomes[:2], flags[:2], sizes, 100.0) is None


def test_copyto_bandwidth_is_measured() -> None:
    assert copyto_bandwidth(1 << 20, repeats=3) > 1e6


def test_spill_counters_come_from_ray_memory_stats() -> None:
    text = (
        "--- Aggregate object store stats across all nodes ---\n"
        "Plasma memory usage 114 MiB, 3 objects, 95.37% full, 63.58% needed\n"
        "Spilled 114 MiB, 3 objects, avg write throughput 130 MiB/s\n"
        "Restored 38 MiB, 1 objects, avg read throughput 729 MiB/s\n"
    )
    after = parse_store_stats(text)
    assert after == {
        "spilled_mib": 114,
        "spilled_objects": 3,
        "restored_mib": 38,
        "restored_objects": 1,
    }
    before = parse_store_stats("Plasma memory usage 0 MiB, 0 objects, 0.0% full\n")
    assert set(before.values()) == {0}
    assert counter_delta(after, before)["restored_objects"] == 1
    assert counter_delta(after, None) == {}


SMAPS = (
    b"00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/python3\n"
    b"Size:                328 kB\n"
    b"Rss:                 300 kB\n"
    b"Pss:                 100 kB\n"
    b"Pss_Anon:             50 kB\n"
    b"7fae80200000-7fb040000000 rw-s 00000000 00:1b 1473     /dev/shm/plasma0dRuIs (deleted)\n"
    b"Size:            7000000 kB\n"
    b"Pss:                2000 kB\n"
    b"7fb040000000-7fb050000000 rw-s 00000000 00:1b 1474     /dev/shm/coe-bench-host0.arena\n"
    b"Pss:                 300 kB\n"
    b"VmFlags: rd wr sh mr mw me ms sd\n"
)


def test_pss_is_split_into_the_object_store_and_the_rest() -> None:
    assert pss_split(SMAPS) == (2400 * 1024, 2000 * 1024)
    assert pss_split(SMAPS.split(b"7fae")[0]) == (100 * 1024, 0)


def test_a_replica_process_is_known_by_its_title_while_it_runs_a_call_too() -> None:
    assert deployment_of("ray::ServeReplica:bench:executors", "bench") == "executors"
    title = "ray::ServeReplica:bench:expert-e12.handle_request_with_rejection"
    assert deployment_of(title, "bench") == "expert-e12"
    assert deployment_of("ray::ServeReplica:bench:placement.reconfigure", "bench") == "placement"
    assert deployment_of("ray::ServeReplica:coe:ingress", "bench") is None
    assert deployment_of("ray::ServeController", "bench") is None


def test_no_replica_process_means_no_memory() -> None:
    assert replica_memory("no-such-application-here") == ProcessMemory(0, 0, 0)


def test_the_timeline_keeps_each_peak() -> None:
    timeline = Timeline()
    timeline.note(ProcessMemory(3, 50, 40, {"ingress": 10, "executors": 30}))
    timeline.note(ProcessMemory(2, 60, 30, {"ingress": 20, "router": 10}))
    assert timeline.peak == ProcessMemory(3, 60, 40, {"ingress": 20, "executors": 30, "router": 10})


def test_the_harness_keeps_each_answer_streamed_or_not() -> None:
    backend = FakeBackend(["general", "math"])
    app = build_http_app(CoEService(ServeSettings(), backend))
    plan = closed_loop(
        ["what is the sum"], ["general", "math"], users=2, count=6, stream_fraction=0.5, seed=3
    )
    with serve_in_thread(app) as url:
        result = run_sync(plan, url, max_tokens=4, timeout_s=10.0, progress=False)
    assert result.start_monotonic is not None
    assert {o.stream for o in result.outcomes} == {True, False}
    for o in result.outcomes:
        expected = "hello world" if o.stream else f"{o.expert} says: what is the sum"
        assert o.ok and o.text == expected


def test_a_reference_check_names_what_differed() -> None:
    check = ReferenceCheck(3, "e7", "a b", "a c")
    assert not check.matches
    assert json.loads(json.dumps(check.to_dict())) == {
        "index": 3,
        "expert": "e7",
        "matches": False,
        "answer": "a b",
        "reference": "a c",
    }
    assert ReferenceCheck(1, "e1", "x", "x").matches
