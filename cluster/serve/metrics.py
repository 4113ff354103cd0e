"""Prometheus metrics of the cluster, through Ray Serve's metrics API.

Two publishers, both plain classes so unit tests run them without Ray:

- `ServeRequestMetrics`, the ingress's request observer: requests by expert,
  category and status with their latency, routing confidence by category, and the
  queue depth per expert as the ingress sees it (dispatched, not yet finished). It
  also keeps the same counts in process, for `coe status`.
- `TierMetrics`, fed by the placement service: its counters are cumulative, so each
  snapshot becomes counter increments (the delta since the previous snapshot).

Metric objects come from a `MetricFactory` (`ray.serve.metrics` in a replica, a
fake in tests) and are created on first use, inside the process that records them:
Ray metric objects belong to the worker that made them. Ray prefixes every
application metric with ``ray_`` when it exports, and counters get ``_total``:
``coe_requests`` is scraped as ``ray_coe_requests_total``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as Tally
from collections.abc import Mapping
from typing import Any, Protocol, cast

from router.decision import RouteDecision

logger = logging.getLogger("ray.serve")

UNKNOWN = "none"  # the tag value for a request that failed before it had an expert
LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
CONFIDENCE_BOUNDARIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]

# Placement counters (memory_tiers.tier_stats.HBMCounters) -> the `event` tag they export as.
TIER_EVENTS = {
    "switches": "switch_in",
    "hits": "hit",
    "misses": "miss",
    "evictions": "eviction",
    "prefetches": "prefetch",
    "failed_switches": "failed_switch",
    "spilled_switches": "spilled_switch",
}
TIER_GAUGES = ("used_bytes", "budget_bytes", "residents")


class CounterLike(Protocol):
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...


class GaugeLike(Protocol):
    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class HistogramLike(Protocol):
    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class MetricFactory(Protocol):
    """The part of `ray.serve.metrics` used here (its classes are the constructors)."""

    def Counter(  # named like the module's classes
        self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None
    ) -> CounterLike: ...

    def Gauge(
        self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None
    ) -> GaugeLike: ...

    def Histogram(
        self,
        name: str,
        description: str = "",
        boundaries: list[float] | None = None,
        tag_keys: tuple[str, ...] | None = None,
    ) -> HistogramLike: ...


def serve_metrics() -> MetricFactory:
    """`ray.serve.metrics`, imported only where metrics are recorded (a Serve replica)."""
    from ray.serve import metrics

    return cast(MetricFactory, metrics)


class _Recorder:
    """Creates metrics lazily and never lets a failing metric fail a request."""

    def __init__(self, factory: MetricFactory | None) -> None:
        self._factory = factory
        self._warned: set[str] = set()

    def factory(self) -> MetricFactory:
        if self._factory is None:
            self._factory = serve_metrics()
        return self._factory

    def guard(self, what: str, error: Exception) -> None:
        # Metrics are a side channel: a broken exporter is worth one warning, not a 500.
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(
                "metrics: recording %s failed: %s: %s", what, type(error).__name__, error
            )


class ServeRequestMetrics:
    """The ingress's `RequestObserver`: Prometheus metrics plus in-process counts.

    `finished` comes exactly once per chat request; `started` once it was dispatched
    to an expert. The queue depth of an expert is started minus finished requests;
    a request that finishes without having started (it failed before dispatch)
    leaves it unchanged.
    """

    def __init__(self, factory: MetricFactory | None = None) -> None:
        self._recorder = _Recorder(factory)
        self._lock = threading.Lock()
        self._requests: dict[str, Tally[str]] = {}
        self._errors: Tally[str] = Tally()
        self._in_flight: Tally[str] = Tally()
        self._routed: Tally[str] = Tally()
        self._fallbacks = 0
        self._total = 0
        self._metrics: dict[str, Any] | None = None

    def _made(self) -> dict[str, Any]:
        if self._metrics is None:
            make = self._recorder.factory()
            self._metrics = {
                "requests": make.Counter(
                    "coe_requests",
                    description="Chat requests finished, by expert, category and status.",
                    tag_keys=("expert", "category", "status"),
                ),
                "latency": make.Histogram(
                    "coe_request_latency_seconds",
                    description="Chat request latency at the ingress, in seconds.",
                    boundaries=LATENCY_BOUNDARIES_S,
                    tag_keys=("expert", "category", "status"),
                ),
                "confidence": make.Histogram(
                    "coe_routing_confidence",
                    description="The router's category confidence, by category and fallback.",
                    boundaries=CONFIDENCE_BOUNDARIES,
                    tag_keys=("category", "fallback"),
                ),
                "queue": make.Gauge(
                    "coe_expert_queue_depth",
                    description="Requests dispatched to an expert and not finished yet.",
                    tag_keys=("expert",),
                ),
            }
        return self._metrics

    def routed(self, decision: RouteDecision) -> None:
        with self._lock:
            self._routed[decision.category] += 1
            self._fallbacks += int(decision.fallback)
        tags = {"category": decision.category, "fallback": str(decision.fallback).lower()}
        try:
            self._made()["confidence"].observe(float(decision.confidence), tags=tags)
        except Exception as error:
            self._recorder.guard("routing confidence", error)

    def started(self, expert: str) -> None:
        with self._lock:
            self._in_flight[expert] += 1
            depth = self._in_flight[expert]
        self._set_queue(expert, depth)

    def finished(
        self, expert: str | None, category: str | None, status: int, seconds: float
    ) -> None:
        expert_tag = expert if expert is not None else UNKNOWN
        depth = None
        with self._lock:
            self._total += 1
            self._requests.setdefault(expert_tag, Tally())[str(status)] += 1
            if status >= 400:
                self._errors[expert_tag] += 1
            if expert is not None and self._in_flight[expert] > 0:
                self._in_flight[expert] -= 1
                depth = self._in_flight[expert]
        tags = {
            "expert": expert_tag,
            "category": category if category is not None else UNKNOWN,
            "status": str(status),
        }
        try:
            made = self._made()
            made["requests"].inc(1.0, tags=tags)
            made["latency"].observe(max(0.0, float(seconds)), tags=tags)
        except Exception as error:
            self._recorder.guard("a finished request", error)
        if expert is not None and depth is not None:
            self._set_queue(expert, depth)

    def _set_queue(self, expert: str, depth: int) -> None:
        try:
            self._made()["queue"].set(float(depth), tags={"expert": expert})
        except Exception as error:
            self._recorder.guard("queue depth", error)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready counts since this replica started (`coe status` sums replicas)."""
        with self._lock:
            return {
                "total": self._total,
                "requests": {
                    expert: dict(sorted(by_status.items()))
                    for expert, by_status in sorted(self._requests.items())
                },
                "errors": dict(sorted(self._errors.items())),
                "in_flight": {e: n for e, n in sorted(self._in_flight.items()) if n > 0},
                "routed": dict(sorted(self._routed.items())),
                "fallbacks": self._fallbacks,
            }


class TierMetrics:
    """Publishes the placement service's cumulative counters as Prometheus counters.

    Each `publish` adds what grew since the previous snapshot. A counter that went
    down, or a new placement incarnation (a restarted service counts from zero),
    starts a new baseline: its whole current value is the increment.
    """

    def __init__(self, factory: MetricFactory | None = None) -> None:
        self._recorder = _Recorder(factory)
        self._lock = threading.Lock()
        self._last: dict[str, dict[str, float]] = {}
        self._incarnation: object = None
        self._metrics: dict[str, Any] | None = None

    def _made(self) -> dict[str, Any]:
        if self._metrics is None:
            make = self._recorder.factory()
            self._metrics = {
                "events": make.Counter(
                    "coe_tier_events",
                    description="Device-tier events: switch_in, hit, miss, eviction, "
                    "prefetch, failed_switch, spilled_switch (a switch that restored the "
                    "expert's bytes from disk first).",
                    tag_keys=("device", "event"),
                ),
                "bytes": make.Counter(
                    "coe_tier_bytes_copied",
                    description="Bytes copied from DDR into a device arena.",
                    tag_keys=("device",),
                ),
                "seconds": make.Counter(
                    "coe_tier_switch_seconds",
                    description="Seconds spent copying experts into a device arena.",
                    tag_keys=("device",),
                ),
                **{
                    name: make.Gauge(
                        f"coe_tier_{name}",
                        description=f"The device tier's {name.replace('_', ' ')} now.",
                        tag_keys=("device",),
                    )
                    for name in TIER_GAUGES
                },
            }
        return self._metrics

    def publish(self, metrics_snapshot: Mapping[str, Any]) -> None:
        """Turn one `PlacementReplica.metrics()` snapshot into metric updates."""
        devices = metrics_snapshot.get("devices")
        if not isinstance(devices, Mapping):
            raise ValueError(
                f"a placement metrics snapshot needs a 'devices' mapping, got {devices!r}"
            )
        parsed = {device: _numbers(device, counters) for device, counters in devices.items()}
        with self._lock:
            incarnation = metrics_snapshot.get("incarnation")
            if incarnation != self._incarnation:
                self._last = {}
                self._incarnation = incarnation
            increments = {
                device: (self._increments(device, current), current)
                for device, current in sorted(parsed.items())
            }
        try:
            made = self._made()
            for device, (deltas, counters) in increments.items():
                for key, event in TIER_EVENTS.items():
                    if deltas.get(key, 0.0) > 0:
                        made["events"].inc(deltas[key], tags={"device": device, "event": event})
                if deltas.get("bytes_moved", 0.0) > 0:
                    made["bytes"].inc(deltas["bytes_moved"], tags={"device": device})
                if deltas.get("switch_seconds", 0.0) > 0:
                    made["seconds"].inc(deltas["switch_seconds"], tags={"device": device})
                for name in TIER_GAUGES:
                    if name in counters:
                        made[name].set(float(counters[name]), tags={"device": device})
        except Exception as error:
            self._recorder.guard("tier metrics", error)

    def _increments(self, device: str, current: dict[str, float]) -> dict[str, float]:
        last = self._last.get(device, {})
        deltas: dict[str, float] = {}
        for key in (*TIER_EVENTS, "bytes_moved", "switch_seconds"):
            if key not in current:
                continue
            before = last.get(key, 0.0)
            deltas[key] = current[key] - before if current[key] >= before else current[key]
        self._last[device] = current
        return deltas


def _numbers(device: object, counters: object) -> dict[str, float]:
    """One device's counters as floats; a malformed snapshot is refused before any update."""
    if not isinstance(device, str) or not isinstance(counters, Mapping):
        raise ValueError(f"device {device!r}: counters must be a mapping, got {counters!r}")
    try:
        return {str(key): float(value) for key, value in counters.items()}
    except (TypeError, ValueError):
        raise ValueError(f"device {device!r}: counters must be numbers, got {counters!r}") from None
