"""The HBM tier of one device: a byte budget leased out to resident experts.

``HBMCache`` is bookkeeping only (no memory is touched here; the placement service
copies bytes into the arena). An expert is *resident* once admitted into a region of
the device's arena; every user holds a ``Lease`` on it. A resident with leases (in
use) or pinned is never evicted; others are evicted in the order the eviction policy
gives when room is needed. Every admission gets a new ``generation`` number, so a
replica knows when its views into the arena must be rebound.

Not thread-safe: the placement service serialises calls with its own lock.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from memory_tiers.arena import Region, RegionAllocator
from memory_tiers.errors import (
    BudgetExceeded,
    ExpertTooLarge,
    LeaseError,
    NotResident,
    PinnedOverBudget,
    TierConfigError,
)
from memory_tiers.eviction import EvictionPolicy, make_policy
from memory_tiers.packing import ALIGNMENT
from memory_tiers.tier_stats import DeviceResidency, HBMCounters, ResidentInfo

# Used to estimate an expert's reload time before its first switch was measured.
DEFAULT_RELOAD_BYTES_PER_S = 10e9

Purpose = Literal["request", "prefetch", "pin"]


@dataclass(frozen=True)
class Lease:
    """The right to use ``expert``'s bytes at ``region`` of ``device`` until released."""

    lease_id: int
    expert: str
    device: str
    region: Region
    generation: int
    needs_copy: bool  # this holder admitted the expert: its bytes must be copied in
    evicted: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "lease_id": self.lease_id,
            "expert": self.expert,
            "device": self.device,
            "offset": self.region.offset,
            "nbytes": self.region.nbytes,
            "generation": self.generation,
            "needs_copy": self.needs_copy,
            "evicted": list(self.evicted),
        }


@dataclass
class _Resident:
    expert: str
    region: Region
    generation: int
    ready: bool
    pinned: bool = False
    leases: set[int] = field(default_factory=set)
    awaiting_first_use: bool = False  # admitted by a prefetch, not yet acquired

    def info(self) -> ResidentInfo:
        return ResidentInfo(
            expert=self.expert,
            offset=self.region.offset,
            nbytes=self.region.nbytes,
            generation=self.generation,
            in_use=len(self.leases),
            pinned=self.pinned,
            ready=self.ready,
        )


class HBMCache:
    """Residency, leases and eviction for one device's byte budget."""

    def __init__(
        self,
        device: str,
        budget_bytes: int,
        policy: EvictionPolicy | str = "lru",
        *,
        alignment: int = ALIGNMENT,
        reload_bytes_per_s: float = DEFAULT_RELOAD_BYTES_PER_S,
    ) -> None:
        if budget_bytes < alignment:
            raise ExpertTooLarge(
                f"device {device!r}: budget of {budget_bytes} bytes is smaller than one "
                f"{alignment}-byte region"
            )
        self.device = device
        self.budget_bytes = budget_bytes
        try:
            self.policy = make_policy(policy) if isinstance(policy, str) else policy
        except ValueError as error:
            raise TierConfigError(f"device {device!r}: {error}") from error
        self.allocator = RegionAllocator(budget_bytes, alignment)
        self.counters = HBMCounters()
        self.reload_bytes_per_s = reload_bytes_per_s
        self._residents: dict[str, _Resident] = {}
        # Residents whose expert was removed or given new bytes while leased, by (expert,
        # generation): never leased again, their bytes stay until their last lease ends.
        self._retired: dict[tuple[str, int], _Resident] = {}
        self._lease_ids = itertools.count(1)
        self._generation = 0
        self._measured_reload: dict[str, float] = {}

    # -- queries -----------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def residents(self) -> list[str]:
        return sorted(self._residents)

    def is_resident(self, expert: str) -> bool:
        return expert in self._residents

    def in_use(self) -> bool:
        """Whether any resident is leased: then a release may yet make room."""
        return any(r.leases for r in self._residents.values()) or bool(self._retired)

    def resident(self, expert: str) -> ResidentInfo | None:
        found = self._residents.get(expert)
        return found.info() if found else None

    def pinned_bytes(self) -> int:
        return sum(
            self.allocator.span(r.region.nbytes) for r in self._residents.values() if r.pinned
        )

    def reload_seconds(self, expert: str, nbytes: int) -> float:
        """The last measured switch time of ``expert``, else an estimate from its size."""
        return self._measured_reload.get(expert, nbytes / self.reload_bytes_per_s)

    def snapshot(self) -> DeviceResidency:
        return DeviceResidency(
            device=self.device,
            budget_bytes=self.budget_bytes,
            used_bytes=self.used_bytes,
            policy=self.policy.name,
            residents=tuple(r.info() for r in sorted(self._residents.values(), key=_by_offset)),
        )

    # -- leases ------------------------------------------------------------------

    def check_fits(self, expert: str, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError(f"expert {expert!r}: size must be positive, got {nbytes}")
        if self.allocator.span(nbytes) > self.capacity:
            raise ExpertTooLarge(
                f"expert {expert!r} needs {nbytes} bytes but device {self.device!r} has a "
                f"budget of {self.budget_bytes} bytes"
            )

    def acquire(
        self, expert: str, nbytes: int, now: float, *, purpose: Purpose = "request"
    ) -> Lease:
        """Lease ``expert``, admitting it (evicting per policy) when it is not resident.

        ``purpose`` says who asks: a request (counted as hit or miss), a prefetch hint
        (counted as a prefetch; the request that follows is its one access), or a pin.
        Raises ``ExpertTooLarge`` if it can never fit and ``BudgetExceeded`` if every
        resident that would have to go is in use or pinned; state is unchanged then.
        """
        self.check_fits(expert, nbytes)
        resident = self._residents.get(expert)
        if resident is not None:
            if resident.region.nbytes != nbytes:
                raise ValueError(
                    f"expert {expert!r} is resident with {resident.region.nbytes} bytes, "
                    f"asked for {nbytes}"
                )
            if purpose == "request":
                self.counters.hits += 1
                if resident.awaiting_first_use:
                    resident.awaiting_first_use = False  # the prefetch counted this access
                else:
                    self.policy.on_access(expert, now)
            return self._lease(resident, needs_copy=False)
        region, victims = self._plan(expert, nbytes, now)
        for victim in victims:
            self._evict(victim)
        self.allocator.reserve(region)
        self._generation += 1
        resident = _Resident(expert, region, self._generation, ready=False)
        resident.awaiting_first_use = purpose == "prefetch"
        self._residents[expert] = resident
        if purpose == "prefetch":
            self.counters.prefetches += 1
        elif purpose == "request":
            self.counters.misses += 1
        self.policy.on_access(expert, now)
        return self._lease(resident, needs_copy=True, evicted=tuple(victims))

    def _lease(self, resident: _Resident, needs_copy: bool, evicted: tuple[str, ...] = ()) -> Lease:
        lease_id = next(self._lease_ids)
        resident.leases.add(lease_id)
        return Lease(
            lease_id=lease_id,
            expert=resident.expert,
            device=self.device,
            region=resident.region,
            generation=resident.generation,
            needs_copy=needs_copy,
            evicted=evicted,
        )

    def _plan(self, expert: str, nbytes: int, now: float) -> tuple[Region, list[str]]:
        """Where ``expert`` would go and whom that evicts, without changing anything."""
        trial = self.allocator.copy()
        region = trial.allocate(nbytes)
        if region is not None:
            return region, []
        candidates = [name for name, r in self._residents.items() if not r.leases and not r.pinned]
        sizes = {name: self._residents[name].region.nbytes for name in candidates}
        reload = {name: self.reload_seconds(name, sizes[name]) for name in candidates}
        order = self.policy.victim_order(candidates, sizes, reload, now)
        freed: list[str] = []
        for victim in order:
            trial.free(self._residents[victim].region)
            freed.append(victim)
            region = trial.allocate(nbytes)
            if region is not None:
                # With fragmentation, only victims overlapping the chosen hole must go.
                needed = [v for v in freed if _overlaps(self._residents[v].region, region, trial)]
                return region, needed
        busy = sorted(n for n, r in self._residents.items() if r.leases or r.pinned)
        raise BudgetExceeded(
            f"device {self.device!r} cannot make room for expert {expert!r} ({nbytes} bytes, "
            f"budget {self.budget_bytes}): residents in use or pinned: {busy}"
        )

    def _evict(self, expert: str) -> None:
        resident = self._residents.pop(expert)
        self.allocator.free(resident.region)
        self.policy.on_evict(expert)
        self.counters.evictions += 1

    def release(self, lease: Lease) -> None:
        resident = self._outstanding(lease)
        resident.leases.discard(lease.lease_id)
        key = (lease.expert, lease.generation)
        if not resident.leases and self._retired.get(key) is resident:
            del self._retired[key]  # the last holder of retired bytes is done with them
            self.allocator.free(resident.region)
            self.counters.evictions += 1

    def _holding(self, expert: str, generation: int) -> _Resident | None:
        """The resident holding ``expert``'s bytes of ``generation``, retired or not."""
        resident = self._residents.get(expert)
        if resident is not None and resident.generation == generation:
            return resident
        return self._retired.get((expert, generation))

    def _outstanding(self, lease: Lease) -> _Resident:
        resident = self._holding(lease.expert, lease.generation)
        if resident is None or lease.lease_id not in resident.leases:
            raise LeaseError(
                f"lease {lease.lease_id} on expert {lease.expert!r} (generation "
                f"{lease.generation}) on device {self.device!r} is not outstanding"
            )
        return resident

    def mark_ready(
        self, lease: Lease, seconds: float, restore_seconds: float | None = None
    ) -> None:
        """The admitting holder finished copying the expert's bytes in ``seconds``, of which
        ``restore_seconds`` (when not None) went to restoring them from disk first."""
        resident = self._outstanding(lease)
        if resident.ready:
            raise LeaseError(f"expert {lease.expert!r} on {self.device!r} is already ready")
        resident.ready = True
        self.counters.switches += 1
        self.counters.bytes_moved += resident.region.nbytes
        self.counters.switch_seconds += seconds
        if restore_seconds is not None:
            self.counters.spilled_switches += 1
            self.counters.restore_seconds += restore_seconds
        # The policy weighs what bringing the expert back costs now, a restore included.
        self._measured_reload[lease.expert] = seconds

    def abort(self, lease: Lease) -> list[int]:
        """The copy for ``lease`` failed: drop the resident; returns the leases cancelled."""
        resident = self._outstanding(lease)
        cancelled = sorted(resident.leases)
        if self._retired.pop((lease.expert, lease.generation), None) is None:
            del self._residents[lease.expert]
            self.policy.on_evict(lease.expert)
        self.allocator.free(resident.region)
        self.counters.failed_switches += 1
        return cancelled

    def is_ready(self, expert: str, generation: int) -> bool:
        resident = self._holding(expert, generation)
        return resident is not None and resident.ready

    # -- pinning and explicit eviction ---------------------------------------------

    def check_pinnable(self, expert: str, nbytes: int) -> None:
        """``PinnedOverBudget`` if pinning ``expert`` would pin more than the budget."""
        self.check_fits(expert, nbytes)
        resident = self._residents.get(expert)
        if resident is not None and resident.pinned:
            return
        total = self.pinned_bytes() + self.allocator.span(nbytes)
        if total > self.capacity:
            pinned = sorted(n for n, r in self._residents.items() if r.pinned)
            raise PinnedOverBudget(
                f"pinning expert {expert!r} ({nbytes} bytes) on device {self.device!r} would "
                f"pin {total} bytes, over the budget of {self.budget_bytes}; pinned: {pinned}"
            )

    def pin(self, expert: str) -> None:
        resident = self._residents.get(expert)
        if resident is None:
            raise NotResident(
                f"expert {expert!r} is not resident on {self.device!r}; admit it first"
            )
        resident.pinned = True

    def unpin(self, expert: str) -> None:
        resident = self._residents.get(expert)
        if resident is not None:
            resident.pinned = False

    def retire(self, expert: str) -> bool:
        """Forget ``expert``'s bytes here: it was removed, or its source changed. Pins go;
        an idle resident is evicted now (True); a leased one is never leased again and
        is evicted when its last lease ends (False), so the next acquire of ``expert``
        switches in its new bytes elsewhere instead of finding the old ones."""
        resident = self._residents.pop(expert, None)
        if resident is None:
            return True
        self.policy.on_evict(expert)
        self._measured_reload.pop(expert, None)
        if resident.leases:
            resident.pinned = False
            self._retired[(expert, resident.generation)] = resident
            return False
        self.allocator.free(resident.region)
        self.counters.evictions += 1
        return True

    def evict(self, expert: str) -> None:
        """Evict an idle, unpinned resident now (administration, benchmarks)."""
        resident = self._residents.get(expert)
        if resident is None:
            raise NotResident(f"expert {expert!r} is not resident on {self.device!r}")
        if resident.leases or resident.pinned:
            raise BudgetExceeded(
                f"expert {expert!r} on {self.device!r} is "
                f"{'pinned' if resident.pinned else 'in use'} and cannot be evicted"
            )
        self._evict(expert)

    # -- restart -----------------------------------------------------------------

    def restore(
        self,
        expert: str,
        region: Region,
        generation: int,
        lease_ids: Iterable[int] = (),
        pinned: bool = False,
    ) -> None:
        """Re-create a resident reported by a replica after a placement-service restart."""
        if expert in self._residents:
            raise ValueError(f"expert {expert!r} is already resident on {self.device!r}")
        self.check_fits(expert, region.nbytes)
        self.allocator.reserve(region)
        resident = _Resident(expert, region, generation, ready=True, pinned=pinned)
        resident.leases.update(lease_ids)
        self._residents[expert] = resident
        self._generation = max(self._generation, generation)
        self._lease_ids = itertools.count(max([next(self._lease_ids), *resident.leases]) + 1)

    # -- invariants (tests) ----------------------------------------------------------

    def check_invariants(self) -> None:
        held = [*self._residents.values(), *self._retired.values()]
        spans = sum(self.allocator.span(r.region.nbytes) for r in held)
        assert spans == self.used_bytes, (spans, self.used_bytes)
        assert 0 <= self.used_bytes <= self.budget_bytes, self.used_bytes
        ordered = sorted(held, key=_by_offset)
        for left, right in itertools.pairwise(ordered):
            assert left.region.offset + self.allocator.span(left.region.nbytes) <= (
                right.region.offset
            ), (left.expert, right.expert)


def _by_offset(resident: _Resident) -> int:
    return resident.region.offset


def _overlaps(victim: Region, chosen: Region, allocator: RegionAllocator) -> bool:
    victim_end = victim.offset + allocator.span(victim.nbytes)
    chosen_end = chosen.offset + allocator.span(chosen.nbytes)
    return victim.offset < chosen_end and chosen.offset < victim_end
