"""Tier counters and snapshots as plain data (JSON-ready via ``to_dict``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class HBMCounters:
    """What happened on one device since start."""

    hits: int = 0
    misses: int = 0
    switches: int = 0  # completed DDR -> device copies
    bytes_moved: int = 0
    switch_seconds: float = 0.0
    evictions: int = 0
    prefetches: int = 0  # admissions started by a prefetch hint
    failed_switches: int = 0
    spilled_switches: int = 0  # switches whose bytes came back from disk (Ray spilled them)
    restore_seconds: float = 0.0  # the part of switch_seconds spent restoring them

    def to_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class ResidentInfo:
    """One resident expert on a device."""

    expert: str
    offset: int
    nbytes: int
    generation: int
    in_use: int
    pinned: bool
    ready: bool


@dataclass(frozen=True)
class DeviceResidency:
    """What one device holds right now (``coe tiers`` prints this)."""

    device: str
    budget_bytes: int
    used_bytes: int
    policy: str
    residents: tuple[ResidentInfo, ...] = field(default_factory=tuple)

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["free_bytes"] = self.free_bytes
        data["residents"] = [asdict(resident) for resident in self.residents]
        return data


@dataclass
class SlotStats:
    """Active-slot (SRAM tier) occupancy and waiting."""

    slots: int
    active: int = 0
    acquisitions: int = 0
    waits: int = 0  # acquisitions that had to wait for a free slot
    wait_seconds_total: float = 0.0
    wait_seconds_max: float = 0.0
    timeouts: int = 0  # acquisitions that gave up waiting (SlotWaitTimeout)

    def to_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def total_slot_stats(per_device: Iterable[SlotStats]) -> SlotStats:
    """Several devices' slots as one (counts summed, the longest wait kept)."""
    total = SlotStats(slots=0)
    for stats in per_device:
        total.slots += stats.slots
        total.active += stats.active
        total.acquisitions += stats.acquisitions
        total.waits += stats.waits
        total.wait_seconds_total += stats.wait_seconds_total
        total.wait_seconds_max = max(total.wait_seconds_max, stats.wait_seconds_max)
        total.timeouts += stats.timeouts
    return total


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def format_residency(devices: dict[str, DeviceResidency]) -> str:
    """A plain-text table of what every device holds (for ``coe tiers``)."""
    lines: list[str] = []
    for name, device in sorted(devices.items()):
        lines.append(
            f"{name}: {_mib(device.used_bytes)} of {_mib(device.budget_bytes)} used, "
            f"policy {device.policy}, {len(device.residents)} resident"
        )
        for resident in device.residents:
            flags = [
                flag
                for flag, on in (
                    ("pinned", resident.pinned),
                    (f"in use x{resident.in_use}", resident.in_use > 0),
                    ("copying", not resident.ready),
                )
                if on
            ]
            lines.append(
                f"  {resident.expert:<28} {_mib(resident.nbytes):>12} at {resident.offset:>12}"
                f"  gen {resident.generation:<6} {' '.join(flags)}".rstrip()
            )
    return "\n".join(lines)
