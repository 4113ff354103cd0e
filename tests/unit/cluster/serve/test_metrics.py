"""The request observer and the tier publisher against a fake of `ray.serve.metrics`."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from cluster.serve.metrics import ServeRequestMetrics, TierMetrics
from memory_tiers.ddr import CallableSource, InProcessObjectStore
from memory_tiers.packing import TensorEntry, TensorIndex
from memory_tiers.placement import DeviceSpec, PlacementService
from router.decision import RouteDecision

Tags = tuple[tuple[str, str], ...]


class FakeMetric:
    """Records what a Ray metric would export: the last value (gauge), the running sum
    (counter) or every observation (histogram), per tag set; refuses bad tags as Ray does."""

    def __init__(self, kind: str, name: str, tag_keys: tuple[str, ...] | None) -> None:
        self.kind, self.name, self.tag_keys = kind, name, tag_keys or ()
        self.values: dict[Tags, float] = {}
        self.observations: dict[Tags, list[float]] = {}

    def _key(self, tags: dict[str, str] | None) -> Tags:
        tags = tags or {}
        if set(tags) != set(self.tag_keys):
            raise ValueError(f"{self.name}: tags {sorted(tags)} != {sorted(self.tag_keys)}")
        if not all(isinstance(value, str) for value in tags.values()):
            raise TypeError(f"{self.name}: tag values must be str, got {tags}")
        return tuple(sorted(tags.items()))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        if value <= 0:
            raise ValueError(f"{self.name}: a counter only grows, got {value}")
        key = self._key(tags)
        self.values[key] = self.values.get(key, 0.0) + value

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.values[self._key(tags)] = value

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.observations.setdefault(self._key(tags), []).append(value)


class FakeMetrics:
    """Has the constructors of `ray.serve.metrics`; remembers every metric it made."""

    def __init__(self) -> None:
        self.made: dict[str, FakeMetric] = {}

    def _make(self, kind: str, name: str, tag_keys: tuple[str, ...] | None) -> FakeMetric:
        if name in self.made:
            raise AssertionError(f"metric {name} created twice")
        self.made[name] = FakeMetric(kind, name, tag_keys)
        return self.made[name]

    def Counter(
        self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None
    ) -> FakeMetric:
        return self._make("counter", name, tag_keys)

    def Gauge(
        self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None
    ) -> FakeMetric:
        return self._make("gauge", name, tag_keys)

    def Histogram(
        self,
        name: str,
        description: str = "",
        boundaries: list[float] | None = None,
        tag_keys: tuple[str, ...] | None = None,
    ) -> FakeMetric:
        assert boundaries == sorted(boundaries or []) and boundaries, name
        return self._make("histogram", name, tag_keys)


def tags(**values: str) -> Tags:
    return tuple(sorted(values.items()))


def decision(expert: str, category: str, confidence: float, fallback: bool) -> RouteDecision:
    return RouteDecision(expert, category, confidence, fallback, scores={category: confidence})


def test_nothing_is_created_before_the_first_event() -> None:
    fake = FakeMetrics()
    ServeRequestMetrics(fake)
    TierMetrics(fake)
    assert fake.made == {}


def test_requests_are_counted_by_expert_category_and_status() -> None:
    fake = FakeMetrics()
    observer = ServeRequestMetrics(fake)
    observer.routed(decision("math-tutor", "math", 0.9, False))
    observer.started("math-tutor")
    observer.routed(decision("generalist", "history", 0.2, True))
    observer.started("generalist")
    observer.finished("math-tutor", "math", 200, 0.5)
    observer.finished("generalist", "history", 429, 0.01)
    observer.finished(None, None, 400, 0.001)  # rejected before routing

    requests = fake.made["coe_requests"].values
    assert requests == {
        tags(expert="math-tutor", category="math", status="200"): 1.0,
        tags(expert="generalist", category="history", status="429"): 1.0,
        tags(expert="none", category="none", status="400"): 1.0,
    }
    latency = fake.made["coe_request_latency_seconds"].observations
    assert latency[tags(expert="math-tutor", category="math", status="200")] == [0.5]
    confidence = fake.made["coe_routing_confidence"].observations
    assert confidence == {
        tags(category="math", fallback="false"): [0.9],
        tags(category="history", fallback="true"): [0.2],
    }
    snapshot = observer.snapshot()
    assert snapshot == {
        "total": 3,
        "requests": {
            "generalist": {"429": 1},
            "math-tutor": {"200": 1},
            "none": {"400": 1},
        },
        "errors": {"generalist": 1, "none": 1},
        "in_flight": {},
        "routed": {"history": 1, "math": 1},
        "fallbacks": 1,
    }
    json.dumps(snapshot)  # it travels over a Serve handle and out of `coe status --json`


def test_queue_depth_follows_started_and_finished_requests() -> None:
    fake = FakeMetrics()
    observer = ServeRequestMetrics(fake)
    for _ in range(3):
        observer.started("coder")
    observer.finished("coder", "code", 200, 1.0)
    queue = fake.made["coe_expert_queue_depth"].values
    assert queue == {tags(expert="coder"): 2.0}
    assert observer.snapshot()["in_flight"] == {"coder": 2}
    observer.finished("coder", "code", 500, 1.0)
    observer.finished("coder", "code", 200, 1.0)
    assert queue == {tags(expert="coder"): 0.0}
    # Failed before dispatch: finished without started must not drive the depth negative.
    observer.finished("coder", "code", 504, 300.0)
    assert queue == {tags(expert="coder"): 0.0}
    assert observer.snapshot()["in_flight"] == {}
    assert observer.snapshot()["errors"] == {"coder": 2}


class BrokenMetrics(FakeMetrics):
    def Counter(
        self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None
    ) -> FakeMetric:
        raise RuntimeError("no metrics agent")


def test_a_broken_exporter_never_fails_a_request(caplog: pytest.LogCaptureFixture) -> None:
    observer = ServeRequestMetrics(BrokenMetrics())

    def one_request() -> int:
        observer.routed(decision("coder", "code", 0.7, False))
        observer.started("coder")
        observer.finished("coder", "code", 200, 0.1)
        return len([r for r in caplog.records if "no metrics agent" in r.getMessage()])

    warned = one_request()
    assert warned == 3  # routing confidence, queue depth, the finished request
    assert one_request() == warned  # warned once per kind, not per request
    assert observer.snapshot()["requests"] == {"coder": {"200": 2}}


def placement_snapshot(service: PlacementService, incarnation: str) -> dict[str, Any]:
    # What PlacementReplica.metrics() sends: the service's metrics plus its own fields.
    return json.loads(json.dumps({**service.metrics(), "incarnation": incarnation}))


def packed(nbytes: int) -> tuple[np.ndarray, TensorIndex]:
    index = TensorIndex((TensorEntry("w", "uint8", (nbytes,), 0, nbytes),), nbytes)
    return np.arange(nbytes, dtype=np.uint8), index


def test_tier_counters_become_increments_of_what_grew() -> None:
    service = PlacementService([DeviceSpec("host0", 4096)], InProcessObjectStore(), "lru")
    for name in ("alpha", "beta", "gamma"):
        service.register(name, CallableSource(lambda: packed(1536), name))
    fake = FakeMetrics()
    publisher = TierMetrics(fake)
    for name in ("alpha", "beta", "alpha"):
        service.release(service.acquire(name, "host0"))
    publisher.publish(placement_snapshot(service, "one"))
    events = fake.made["coe_tier_events"].values
    assert events == {
        tags(device="host0", event="switch_in"): 2.0,
        tags(device="host0", event="miss"): 2.0,
        tags(device="host0", event="hit"): 1.0,
    }
    assert fake.made["coe_tier_bytes_copied"].values == {tags(device="host0"): 3072.0}
    assert fake.made["coe_tier_used_bytes"].values == {tags(device="host0"): 3072.0}

    publisher.publish(placement_snapshot(service, "one"))  # nothing happened: nothing added
    assert sum(events.values()) == 5.0

    service.release(service.acquire("gamma", "host0"))  # evicts the least recent (beta)
    assert service.prefetch("beta", "host0")  # and back, through a hint
    publisher.publish(placement_snapshot(service, "one"))
    assert events[tags(device="host0", event="eviction")] == 2.0
    assert events[tags(device="host0", event="prefetch")] == 1.0
    assert events[tags(device="host0", event="switch_in")] == 4.0
    assert fake.made["coe_tier_bytes_copied"].values == {tags(device="host0"): 6144.0}


def test_a_restarted_placement_service_starts_a_new_baseline() -> None:
    fake = FakeMetrics()
    publisher = TierMetrics(fake)
    counters = {"hits": 10.0, "switches": 4.0, "bytes_moved": 400.0}
    publisher.publish({"devices": {"host0": counters}, "incarnation": "one"})
    # The new incarnation counts from zero; its 3 hits are new, not 7 fewer.
    publisher.publish({"devices": {"host0": {**counters, "hits": 3.0}}, "incarnation": "two"})
    events = fake.made["coe_tier_events"].values
    assert events[tags(device="host0", event="hit")] == 13.0
    assert events[tags(device="host0", event="switch_in")] == 8.0
    # A counter that went down within one incarnation is a reset too.
    publisher.publish({"devices": {"host0": {**counters, "hits": 1.0}}, "incarnation": "two"})
    assert events[tags(device="host0", event="hit")] == 14.0


@pytest.mark.parametrize(
    "snapshot",
    [{}, {"devices": ["host0"]}, {"devices": {"host0": {"hits": "many"}}}],
)
def test_a_malformed_snapshot_is_refused_and_changes_nothing(snapshot: dict[str, Any]) -> None:
    fake = FakeMetrics()
    publisher = TierMetrics(fake)
    publisher.publish({"devices": {"host0": {"hits": 2.0}}, "incarnation": "one"})
    with pytest.raises(ValueError, match=r"devices|host0"):
        publisher.publish(snapshot)
    publisher.publish({"devices": {"host0": {"hits": 3.0}}, "incarnation": "one"})
    assert fake.made["coe_tier_events"].values == {tags(device="host0", event="hit"): 3.0}
