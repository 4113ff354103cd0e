"""The placement service: registry of experts, HBM leases per device, switches, prefetch.

A plain class (the cluster runs it as one named actor). It owns the DDR copies of
every expert (so they outlive replicas), one ``HBMCache`` per device, and each
device's arena: a host arena (a shared file on a CPU node) or a GPU's memory, which
the replicas on that GPU map through CUDA IPC. It performs the DDR -> arena copy
itself, so a prefetch hint starts a switch while the request is still queued, and
replicas only rebind views. A zero-copy device has no arena: replicas bind the DDR
buffer itself.

Concurrency: every method is safe to call from several threads. Bookkeeping runs
under one lock; copies run outside it, so a hit never waits behind another expert's
copy. Two acquires of the same expert share one copy: the second waits for the first.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from memory_tiers.arena import DeviceArena, Region
from memory_tiers.ddr import DDRStore, ExpertSource, ObjectStore, Packed
from memory_tiers.device_memory import ArenaShare
from memory_tiers.errors import (
    BudgetExceeded,
    SwitchFailed,
    TierConfigError,
    UnknownDevice,
    UnknownExpert,
)
from memory_tiers.eviction import POLICY_NAMES, make_policy
from memory_tiers.hbm import HBMCache, Lease, Purpose
from memory_tiers.packing import TensorIndex
from memory_tiers.switch import copy_into
from memory_tiers.tier_stats import DeviceResidency

# How long a request waits for in-use experts to make room before it fails.
ROOM_WAIT_S = 120.0


@dataclass(frozen=True)
class DeviceSpec:
    """One device: a named memory pool with a byte budget.

    ``arena``: "file" = shared host arena at ``arena_path`` (created or re-attached);
    "memory" = host arena private to this process; "cuda" = one block of the GPU
    ``cuda_device``'s memory, shared with the replicas on that GPU; "fake" = a stand-in
    for "cuda" in one process (tests); "object_store" = no arena: on a CPU node the
    object store's shared memory already is device memory, so replicas bind an expert
    straight to its DDR buffer (read-only, zero-copy) and the budget, leases, pins and
    eviction only account for it.
    """

    name: str
    budget_bytes: int
    arena: Literal["memory", "file", "cuda", "fake", "object_store"] = "memory"
    arena_path: Path | None = None
    cuda_device: str = "cuda"


@dataclass(frozen=True)
class ExpertRecord:
    expert: str
    nbytes: int
    devices: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class ResidencyReport:
    """What a replica holds after a placement-service restart."""

    expert: str
    device: str
    offset: int
    nbytes: int
    generation: int
    lease_ids: tuple[int, ...] = ()
    pinned: bool = False


class PlacementService:
    """Registry + leases + switches for every device of a node (see module docstring)."""

    def __init__(
        self,
        devices: Sequence[DeviceSpec],
        store: ObjectStore,
        policy: str = "lru",
        *,
        clock: Callable[[], float] = time.monotonic,
        room_wait_s: float = ROOM_WAIT_S,
    ) -> None:
        if policy not in POLICY_NAMES:
            raise TierConfigError(
                f"unknown eviction policy {policy!r}; choose one of {', '.join(POLICY_NAMES)}"
            )
        names = [spec.name for spec in devices]
        if not names or len(set(names)) != len(names):
            raise TierConfigError(f"device names must be present and unique, got {names}")
        for spec in devices:
            if spec.arena == "file" and spec.arena_path is None:
                raise TierConfigError(f"device {spec.name!r}: a file arena needs arena_path")
        self.policy = policy
        self.ddr = DDRStore(store)
        self._clock = clock
        self._lock = threading.Lock()
        # Signalled whenever a lease ends or a switch is abandoned: room may have freed up.
        self._room = threading.Condition(self._lock)
        self.room_wait_s = room_wait_s
        self._specs = {spec.name: spec for spec in devices}
        self._caches = {
            spec.name: HBMCache(spec.name, spec.budget_bytes, make_policy(policy))
            for spec in devices
        }
        self._arenas = {
            spec.name: _open_arena(spec) for spec in devices if spec.arena != "object_store"
        }
        self._experts: dict[str, ExpertRecord] = {}
        self._pending: dict[tuple[str, str, int], threading.Event] = {}

    # -- registry ----------------------------------------------------------------

    def devices(self) -> list[str]:
        return sorted(self._specs)

    def register(
        self,
        expert: str,
        source: ExpertSource,
        *,
        devices: Sequence[str] | None = None,
        packed: Packed | None = None,
    ) -> ExpertRecord:
        """Pack ``expert`` (unless ``packed`` is given) into DDR; it may use ``devices``.

        Registering an expert again (its source changed) replaces its bytes: its old
        residents are retired (see ``retire``), so no lease ever hands out the old bytes
        under the new record. ``ExpertTooLarge`` (nothing changed) if it can never fit
        one of those devices.
        """
        chosen = tuple(devices) if devices is not None else tuple(sorted(self._specs))
        for device in chosen:
            self._cache(device)
        buffer, index = packed if packed is not None else source.build()
        for device in chosen:
            self._caches[device].check_fits(expert, index.total_bytes)
        record = ExpertRecord(expert, index.total_bytes, chosen, source.describe())
        with self._lock:
            replacing = expert in self._experts
            if replacing:  # rare (a config change): the lock keeps old and new apart
                self._retire_residents(expert)
                self.ddr.register(expert, source, (buffer, index))
                self._experts[expert] = record
        if not replacing:  # the object-store put runs outside the lock
            self.ddr.register(expert, source, (buffer, index))
            with self._lock:
                self._experts[expert] = record
        return record

    def unregister(self, expert: str) -> None:
        """Remove ``expert``: unpinned, its residents retired (evicted now when idle, else
        when their last lease ends) and its DDR copy freed. Unknown experts are refused."""
        with self._lock:
            self.record(expert)
            self._retire_residents(expert)
            del self._experts[expert]
            self.ddr.unregister(expert)

    def _retire_residents(self, expert: str) -> None:
        for cache in self._caches.values():
            cache.retire(expert)
        self._room.notify_all()  # an idle resident's room is free now

    def experts(self) -> list[str]:
        return sorted(self._experts)

    def record(self, expert: str) -> ExpertRecord:
        found = self._experts.get(expert)
        if found is None:
            raise UnknownExpert(f"unknown expert {expert!r}; registered: {self.experts()}")
        return found

    def index(self, expert: str) -> TensorIndex:
        """The expert's tensor index (a replica builds views with it)."""
        self.record(expert)
        return self.ddr.index(expert)

    def ddr_ref(self, expert: str) -> Any:
        """The object-store reference of the expert's packed buffer (replica-side copies)."""
        self.record(expert)
        return self.ddr.entry(expert).ref

    def ddr_buffer(self, expert: str) -> np.ndarray:
        """The expert's packed buffer, rebuilt from disk if the store lost it."""
        self.record(expert)
        return self.ddr.get(expert)[0]

    def arena(self, device: str) -> DeviceArena:
        """The arena of ``device`` (in-process replicas, restart checks, tests)."""
        self._cache(device)
        if device not in self._arenas:
            raise UnknownDevice(f"device {device!r} has no arena: its replicas bind DDR")
        return self._arenas[device]

    def arena_kind(self, device: str) -> str:
        """What holds ``device``'s residents: its ``DeviceSpec.arena``."""
        return self._specs[self._cache(device).device].arena

    def arena_share(self, device: str) -> ArenaShare | None:
        """How replicas on ``device`` map its arena; None on a zero-copy device."""
        self._cache(device)
        arena = self._arenas.get(device)
        return arena.share() if arena is not None else None

    def arena_path(self, device: str) -> Path | None:
        return self._specs[self._cache(device).device].arena_path

    def _cache(self, device: str) -> HBMCache:
        cache = self._caches.get(device)
        if cache is None:
            raise UnknownDevice(f"unknown device {device!r}; devices: {self.devices()}")
        return cache

    def _usable(self, expert: str, device: str) -> tuple[HBMCache, int]:
        cache = self._cache(device)
        record = self.record(expert)
        if device not in record.devices:
            raise UnknownDevice(
                f"expert {expert!r} is not placed on device {device!r}; its devices: "
                f"{list(record.devices)}"
            )
        return cache, record.nbytes

    # -- leases ------------------------------------------------------------------

    def acquire(self, expert: str, device: str) -> Lease:
        """Lease ``expert`` on ``device``, switching it in first when it is not resident.

        Blocks for the copy (its own or a concurrent acquirer's); call it from a worker
        thread, or use ``acquire_async``. Release the lease when done.
        """
        return self._acquire(expert, device, "request")

    async def acquire_async(self, expert: str, device: str) -> Lease:
        """``acquire`` on a worker thread, leaving the caller's event loop free."""
        return await asyncio.to_thread(self.acquire, expert, device)

    def _acquire(self, expert: str, device: str, purpose: Purpose) -> Lease:
        cache, nbytes = self._usable(expert, device)
        with self._lock:
            lease = self._acquire_when_room(cache, expert, nbytes, purpose)
            key = (device, expert, lease.generation)
            if lease.needs_copy:
                pending: threading.Event | None = threading.Event()
                self._pending[key] = pending  # type: ignore[assignment]
            else:
                pending = self._pending.get(key)
        if lease.needs_copy:
            if device in self._arenas:
                self._switch_in(cache, lease)
            else:
                self._switch_in_place(cache, lease)
            return lease
        if pending is not None:
            # The copy may be stuck (a restore from a slow disk, a wedged GPU copy): a
            # waiter gives up (its lease back) rather than wait forever.
            if not pending.wait(self.room_wait_s):
                self.release(lease)
                raise SwitchFailed(
                    f"switching expert {expert!r} into {device!r}: another caller's copy "
                    f"did not finish within {self.room_wait_s:g} s"
                )
            with self._lock:
                if not cache.is_ready(expert, lease.generation):
                    raise SwitchFailed(
                        f"switching expert {expert!r} into {device!r} failed in another caller"
                    )
        return lease

    def _acquire_when_room(
        self, cache: HBMCache, expert: str, nbytes: int, purpose: Purpose
    ) -> Lease:
        """`cache.acquire`, waiting (lock released) while in-use experts fill the budget.

        Every lease ends, so a request waits for room rather than failing; a prefetch
        does not wait, and room blocked by pinned experts alone never comes.
        """
        deadline = time.monotonic() + self.room_wait_s
        while True:
            try:
                return cache.acquire(expert, nbytes, self._clock(), purpose=purpose)
            except BudgetExceeded:
                remaining = deadline - time.monotonic()
                if purpose != "request" or not cache.in_use() or remaining <= 0:
                    raise
                self._room.wait(remaining)

    def _switch_in(self, cache: HBMCache, lease: Lease) -> None:
        try:
            started = time.perf_counter()
            buffer, _, restored = self.ddr.fetch(lease.expert)
            fetched = time.perf_counter()
            copy_into(self._arenas[lease.device].view(lease.region), buffer)
            seconds = time.perf_counter() - started
        except BaseException as error:
            self._finish(cache, lease, None)
            raise SwitchFailed(
                f"switching expert {lease.expert!r} into {lease.device!r} failed: {error}"
            ) from error
        self._finish(cache, lease, seconds, fetched - started if restored else None)

    def _switch_in_place(self, cache: HBMCache, lease: Lease) -> None:
        """A zero-copy device's switch: nothing to copy, but a spilled object is restored
        now (not in the replica's bind), so its cost is counted where switches are."""
        try:
            started = time.perf_counter()
            _, _, restored = self.ddr.fetch(lease.expert)
            seconds = time.perf_counter() - started
        except BaseException as error:
            self._finish(cache, lease, None)
            raise SwitchFailed(
                f"switching expert {lease.expert!r} into {lease.device!r} failed: {error}"
            ) from error
        self._finish(cache, lease, seconds, seconds if restored else None)

    def zero_copy(self, device: str) -> bool:
        """Whether ``device``'s replicas bind experts straight to their DDR buffers."""
        return self._specs[self._cache(device).device].arena == "object_store"

    def _finish(
        self,
        cache: HBMCache,
        lease: Lease,
        seconds: float | None,
        restore_seconds: float | None = None,
    ) -> None:
        with self._lock:
            if seconds is None:
                cache.abort(lease)
                self._room.notify_all()
            else:
                cache.mark_ready(lease, seconds, restore_seconds)
            pending = self._pending.pop((lease.device, lease.expert, lease.generation), None)
        if pending is not None:
            pending.set()

    def release(self, lease: Lease) -> None:
        cache = self._cache(lease.device)
        with self._lock:
            cache.release(lease)
            self._room.notify_all()

    def prefetch(self, expert: str, device: str) -> bool:
        """Start switching ``expert`` in ahead of its request; True if a copy was made.

        A hint: a no-op when resident, or when room would need an in-use or pinned
        expert to go.
        """
        cache, _ = self._usable(expert, device)
        with self._lock:
            if cache.is_resident(expert):
                return False
        try:
            lease = self._acquire(expert, device, "prefetch")
        except BudgetExceeded:
            return False
        self.release(lease)
        return lease.needs_copy

    # -- pinning and eviction ----------------------------------------------------------

    def pin(self, expert: str, device: str) -> None:
        """Make ``expert`` resident on ``device`` and keep it there until ``unpin``."""
        cache, nbytes = self._usable(expert, device)
        with self._lock:
            cache.check_pinnable(expert, nbytes)
        lease = self._acquire(expert, device, "pin")
        try:
            with self._lock:
                cache.check_pinnable(expert, nbytes)
                cache.pin(expert)
        finally:
            self.release(lease)

    def unpin(self, expert: str, device: str) -> None:
        cache, _ = self._usable(expert, device)
        with self._lock:
            cache.unpin(expert)

    def evict(self, expert: str, device: str) -> None:
        """Evict an idle, unpinned expert now."""
        cache, _ = self._usable(expert, device)
        with self._lock:
            cache.evict(expert)

    # -- observability -------------------------------------------------------------

    def residency(self) -> dict[str, DeviceResidency]:
        with self._lock:
            return {name: cache.snapshot() for name, cache in sorted(self._caches.items())}

    def residency_json(self) -> dict[str, Any]:
        return {name: snapshot.to_dict() for name, snapshot in self.residency().items()}

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            devices = {
                name: {
                    **cache.counters.to_dict(),
                    "budget_bytes": float(cache.budget_bytes),
                    "used_bytes": float(cache.used_bytes),
                    "residents": float(len(cache.residents())),
                }
                for name, cache in sorted(self._caches.items())
            }
        return {"policy": self.policy, "devices": devices, "ddr": self.ddr.metrics()}

    # -- restart -------------------------------------------------------------------

    def restore_from_reports(self, reports: Iterable[ResidencyReport]) -> list[str]:
        """Rebuild residency from what replicas report; returns the reports refused, and why.

        Register the experts first. Reports of one resident (same expert, device,
        generation, region) from several replicas merge their leases; when reports
        disagree the newest generation wins.
        """
        merged: dict[tuple[str, str, int, int, int], list[ResidencyReport]] = {}
        for report in reports:
            key = (report.device, report.expert, report.generation, report.offset, report.nbytes)
            merged.setdefault(key, []).append(report)
        refused: list[str] = []
        with self._lock:
            for key in sorted(merged, key=lambda k: -k[2]):
                device, expert, generation, offset, nbytes = key
                group = merged[key]
                reason = self._restore_one(
                    device, expert, generation, Region(offset, nbytes), group
                )
                if reason:
                    refused.append(f"{expert!r} on {device!r} (generation {generation}): {reason}")
        return refused

    def _restore_one(
        self,
        device: str,
        expert: str,
        generation: int,
        region: Region,
        group: list[ResidencyReport],
    ) -> str:
        cache = self._caches.get(device)
        record = self._experts.get(expert)
        if cache is None:
            return "unknown device"
        if record is None:
            return "expert not registered"
        if record.nbytes != region.nbytes:
            return f"size {region.nbytes} differs from the registered {record.nbytes}"
        if cache.is_resident(expert):
            return "a newer report already restored it"
        lease_ids = sorted({lease for report in group for lease in report.lease_ids})
        try:
            cache.restore(
                expert,
                region,
                generation,
                lease_ids=lease_ids,
                pinned=any(report.pinned for report in group),
            )
        except Exception as error:
            return str(error)
        return ""

    def close(self) -> None:
        for arena in self._arenas.values():
            arena.close()


def _open_arena(spec: DeviceSpec) -> DeviceArena:
    if spec.arena == "file":
        assert spec.arena_path is not None
        return DeviceArena.open_file(spec.arena_path, spec.budget_bytes)
    if spec.arena == "cuda":
        return DeviceArena.cuda(spec.budget_bytes, spec.cuda_device)
    if spec.arena == "fake":
        return DeviceArena.fake_device(spec.budget_bytes)
    return DeviceArena.in_memory(spec.budget_bytes)
