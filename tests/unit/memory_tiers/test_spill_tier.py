"""The fourth tier: an expert the object store spilled to disk is restored by its next
switch, which is counted and timed, and the eviction cost model sees the restore."""

from __future__ import annotations

import numpy as np

from cluster.cli.tier_commands import format_status
from memory_tiers.ddr import CallableSource, DDRStore, InProcessObjectStore
from memory_tiers.packing import TensorEntry, TensorIndex
from memory_tiers.placement import DeviceSpec, PlacementService

MIB = 2**20


def _packed(fill: int) -> tuple[np.ndarray, TensorIndex]:
    index = TensorIndex((TensorEntry("w", "uint8", (MIB,), 0, MIB),), MIB)
    return np.full(MIB, fill, dtype=np.uint8), index


def test_a_get_of_a_spilled_object_is_counted_as_a_restore() -> None:
    store = InProcessObjectStore()
    ddr = DDRStore(store)
    ddr.register("a", CallableSource(lambda: _packed(1), "a"))
    assert ddr.fetch("a")[2] is False
    store.spill(ddr.entry("a").ref)
    buffer, _, restored = ddr.fetch("a")
    assert restored is True and int(buffer[0]) == 1
    assert ddr.fetch("a")[2] is False  # back in memory
    metrics = ddr.metrics()
    assert metrics["restores"] == 1 and metrics["restore_seconds"] >= 0


def test_a_switch_of_a_spilled_expert_restores_it_and_is_counted() -> None:
    store = InProcessObjectStore()
    service = PlacementService([DeviceSpec("host0", 2 * MIB)], store, "lru")
    for fill, name in enumerate(("a", "b", "c"), start=1):
        service.register(name, CallableSource(lambda fill=fill: _packed(fill), name))
    service.release(service.acquire("a", "host0"))
    store.spill(service.ddr.entry("c").ref)
    lease = service.acquire("c", "host0")
    region = service.arena("host0").host_view(lease.region)
    assert int(region[0]) == 3  # the restored bytes, not stale ones
    service.release(lease)
    counters = service.metrics()["devices"]["host0"]
    assert counters["switches"] == 2
    assert counters["spilled_switches"] == 1
    assert 0 <= counters["restore_seconds"] <= counters["switch_seconds"]
    text = format_status(service.residency_json(), service.metrics())
    assert "1 restored from disk in" in text


def test_without_spills_the_status_line_says_nothing_of_disk() -> None:
    service = PlacementService([DeviceSpec("host0", 2 * MIB)], InProcessObjectStore(), "lru")
    service.register("a", CallableSource(lambda: _packed(1), "a"))
    service.release(service.acquire("a", "host0"))
    assert "disk" not in format_status(service.residency_json(), service.metrics())
