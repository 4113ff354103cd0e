"""Tier simulator: replay a request trace against a hardware profile and an eviction policy.

The model, from first principles:
- Every expert lives in host memory (DDR). A node's devices form `devices / expert_shards`
  groups; each group holds whole experts (split over its shards) in its usable HBM.
- A request for a resident expert is a hit. Otherwise it is a switch: the policy picks
  victims in one group until the expert fits, then the expert's bytes move at the
  profile's switch bandwidth (each shard over its own host link, up to the node cap):
  switch seconds = bytes / switch bandwidth. Pinned experts load before the trace and
  never leave.
- Optional compute: output tokens / tokens per second, fixed or "roofline" (batch-1
  decode reads every weight once per token: HBM read bandwidth / expert bytes).
- Requests are served one at a time per node in arrival order (the paper's batch-1
  view): parallel groups add capacity, not concurrency.
- If the expert set exceeds host memory the result says so: those experts would have
  to come from storage, which the model does not charge (so the estimate is optimistic).

The command line is `python -m benchmarks.tier_sim` (this package's `__main__`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from benchmarks.tier_sim.profiles import GB, HardwareProfile
from benchmarks.tier_sim.trace import Request
from memory_tiers.eviction import EvictionPolicy, make_policy

TB = 1e12


class SimulationError(ValueError):
    """A simulation that cannot run as asked; the message names the bad value."""


@dataclass(frozen=True)
class ExpertCounts:
    """What one expert saw during a replay."""

    requests: int = 0
    hits: int = 0
    switches: int = 0


@dataclass(frozen=True)
class SimulationResult:
    """Counts and predicted times of one replay."""

    profile: str
    policy: str
    expert_shards: int
    requests: int
    hits: int
    switches: int
    evictions: int
    hit_rate: float
    bytes_moved: int
    switch_bytes_per_s: float
    switch_seconds: float
    compute_seconds: float
    busy_seconds: float  # switch + compute: the node's service time
    total_seconds: float  # first arrival -> last request finished (includes idle gaps)
    mean_latency_s: float  # arrival -> finish, averaged over requests
    hbm_capacity_bytes: int
    hosted_experts: int  # the catalog, pins and every expert the trace names
    expert_set_bytes: int
    host_memory_bytes: int
    fits_in_host_memory: bool
    warnings: tuple[str, ...]
    per_expert: dict[str, ExpertCounts] = field(repr=False)

    def to_dict(self, per_expert: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data["warnings"] = list(self.warnings)
        if not per_expert:
            del data["per_expert"]
        return data


def _sizes(
    requests: Sequence[Request],
    expert_bytes: int | Mapping[str, int],
    pinned: Sequence[str],
    catalog: Sequence[str],
) -> dict[str, int]:
    named = [*catalog, *pinned, *(request.expert for request in requests)]
    names = list(dict.fromkeys(named))
    if isinstance(expert_bytes, int):
        sizes = dict.fromkeys(names, expert_bytes)
    else:
        missing = [name for name in names if name not in expert_bytes]
        if missing:
            raise SimulationError(f"no size given for expert(s) {missing[:5]} (of {len(missing)})")
        sizes = {name: expert_bytes[name] for name in names}
    bad = {name: size for name, size in sizes.items() if isinstance(size, bool) or size <= 0}
    if bad:
        raise SimulationError(f"expert sizes must be positive byte counts, got {bad}")
    return sizes


class _DeviceGroups:
    """Which expert sits in which device group, and each group's free bytes."""

    def __init__(self, groups: int, capacity: int) -> None:
        self.capacity = capacity
        self.free = [capacity] * groups
        self.where: dict[str, int] = {}

    def place(self, expert: str, size: int, group: int) -> None:
        self.free[group] -= size
        self.where[expert] = group

    def remove(self, expert: str, size: int) -> None:
        self.free[self.where.pop(expert)] += size

    def fitting_group(self, size: int) -> int | None:
        fits = [g for g, free in enumerate(self.free) if free >= size]
        return min(fits, key=lambda g: (self.free[g], g)) if fits else None


def simulate(
    trace: Sequence[Request],
    profile: HardwareProfile,
    policy: str | EvictionPolicy = "lru",
    *,
    expert_bytes: int | Mapping[str, int],
    pinned: Sequence[str] = (),
    catalog: Sequence[str] = (),
    tokens_per_s: float | Literal["roofline"] | None = None,
    default_output_tokens: int = 0,
) -> SimulationResult:
    """Replay `trace` on `profile`; see the module docstring for the model.

    `policy` is a name (a fresh policy per call) or an instance, which the replay mutates.
    `expert_bytes` is one size for every expert or a size per expert; `catalog` names
    experts the node hosts beyond those the trace requests (they count toward the
    expert set that host memory must hold).
    """
    if not trace:
        raise SimulationError("the trace has no requests")
    if isinstance(tokens_per_s, float | int) and not tokens_per_s > 0:
        raise SimulationError(f"tokens_per_s must be positive, got {tokens_per_s!r}")
    if default_output_tokens < 0:
        raise SimulationError(f"default_output_tokens must be >= 0, got {default_output_tokens}")
    chooser = make_policy(policy) if isinstance(policy, str) else policy
    sizes = _sizes(trace, expert_bytes, pinned, catalog)
    groups = _DeviceGroups(profile.groups, profile.group_hbm_bytes)
    too_big = {e: s for e, s in sizes.items() if s > groups.capacity}
    if too_big:
        raise SimulationError(
            f"expert(s) larger than one device group's usable HBM ({groups.capacity} bytes "
            f"on {profile.name} with expert_shards={profile.expert_shards}): {too_big}"
        )
    bandwidth = profile.switch_bytes_per_s
    reload_s = {expert: size / bandwidth for expert, size in sizes.items()}
    pinned_set = set(pinned)
    for expert in pinned:
        group = groups.fitting_group(sizes[expert])
        if group is None:
            raise SimulationError(f"pinned expert {expert!r} does not fit beside the other pins")
        groups.place(expert, sizes[expert], group)
        chooser.on_access(expert, 0.0)

    def make_room(expert: str, now: float) -> tuple[int, int]:
        size = sizes[expert]
        group = groups.fitting_group(size)
        if group is not None:
            return group, 0
        candidates = [e for e in groups.where if e not in pinned_set]
        order = chooser.victim_order(candidates, {e: sizes[e] for e in candidates}, reload_s, now)
        if sorted(order) != sorted(candidates):
            raise SimulationError(f"policy {chooser.name!r} did not return a candidate order")
        freed = [0] * len(groups.free)
        chosen: list[list[str]] = [[] for _ in groups.free]
        for victim in order:  # evict in policy order, but only from the group that fits first
            where = groups.where[victim]
            chosen[where].append(victim)
            freed[where] += sizes[victim]
            if groups.free[where] + freed[where] >= size:
                for evicted in chosen[where]:
                    groups.remove(evicted, sizes[evicted])
                    chooser.on_evict(evicted)
                return where, len(chosen[where])
        raise SimulationError(f"no room for {expert!r}: pinned experts fill the device groups")

    counts: dict[str, ExpertCounts] = {}
    hits = switches = evictions = moved = 0
    switch_seconds = compute_seconds = latency_sum = 0.0
    server_free = trace[0].arrival_s
    for request in trace:
        start = max(request.arrival_s, server_free)
        expert = request.expert
        seen = counts.get(expert, ExpertCounts())
        switch_s = 0.0
        if expert in groups.where:
            hits += 1
            counts[expert] = ExpertCounts(seen.requests + 1, seen.hits + 1, seen.switches)
        else:
            group, evicted = make_room(expert, start)
            groups.place(expert, sizes[expert], group)
            evictions += evicted
            switches += 1
            moved += sizes[expert]
            switch_s = reload_s[expert]
            counts[expert] = ExpertCounts(seen.requests + 1, seen.hits, seen.switches + 1)
        chooser.on_access(expert, start)
        tokens = request.output_tokens
        tokens = default_output_tokens if tokens is None else tokens
        if tokens_per_s == "roofline":
            compute_s = tokens * sizes[expert] / profile.decode_read_bytes_per_s
        elif tokens_per_s is not None:
            compute_s = tokens / tokens_per_s
        else:
            compute_s = 0.0
        switch_seconds += switch_s
        compute_seconds += compute_s
        server_free = start + switch_s + compute_s
        latency_sum += server_free - request.arrival_s

    expert_set = sum(sizes.values())
    host = profile.host_memory_bytes
    warnings = []
    if expert_set > host:
        warnings.append(
            f"expert set ({len(sizes)} experts, {expert_set / TB:.2f} TB) exceeds "
            f"{profile.name}'s host memory ({host / TB:.2f} TB) by {(expert_set - host) / TB:.2f}"
            " TB: those bytes would be re-read from storage, which is not charged here"
        )
    if expert_set > groups.capacity * len(groups.free):
        warnings.append(
            f"expert set does not fit {profile.name}'s usable HBM "
            f"({groups.capacity * len(groups.free) / TB:.2f} TB): experts spill to host memory "
            f"and switch in at {bandwidth / GB:.0f} GB/s"
        )
    return SimulationResult(
        profile=profile.name,
        policy=chooser.name,
        expert_shards=profile.expert_shards,
        requests=len(trace),
        hits=hits,
        switches=switches,
        evictions=evictions,
        hit_rate=hits / len(trace),
        bytes_moved=moved,
        switch_bytes_per_s=bandwidth,
        switch_seconds=switch_seconds,
        compute_seconds=compute_seconds,
        busy_seconds=switch_seconds + compute_seconds,
        total_seconds=server_free - trace[0].arrival_s,
        mean_latency_s=latency_sum / len(trace),
        hbm_capacity_bytes=groups.capacity * len(groups.free),
        hosted_experts=len(sizes),
        expert_set_bytes=expert_set,
        host_memory_bytes=host,
        fits_in_host_memory=expert_set <= host,
        warnings=tuple(warnings),
        per_expert=dict(sorted(counts.items())),
    )


def hbm_capacity_experts(profile: HardwareProfile, expert_bytes: int) -> int:
    """How many experts of `expert_bytes` the node's HBM holds at once."""
    return profile.groups * (profile.group_hbm_bytes // expert_bytes)
