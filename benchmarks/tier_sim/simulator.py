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
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from benchmarks.tier_sim.profiles import GB, HardwareProfile, ProfileError, load_profile
from benchmarks.tier_sim.trace import (
    Request,
    TraceError,
    load_trace,
    write_jsonl,
    zipf_trace,
)
from memory_tiers.eviction import POLICY_NAMES, EvictionPolicy, make_policy

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


# --- command line -----------------------------------------------------------------------------


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def _write_json(data: dict[str, Any], path: str | None) -> None:
    if path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {target}", file=sys.stderr)


def _paper(args: argparse.Namespace) -> int:
    # Imported here: paper_comparison builds on this module's simulate().
    from benchmarks.tier_sim.paper_comparison import paper_comparison

    print(f"simulating {args.experts} experts x {args.params_b}B ...", file=sys.stderr)
    report = paper_comparison(
        n_experts=args.experts,
        params_b=args.params_b,
        n_requests=args.requests,
        zipf_s=args.zipf_s,
        policy=args.policy,
        seed=args.seed,
    )
    rows = [["profile", "GB/s", "ms/switch", "HBM experts", "switches", "switch s", "vs SN40L"]]
    for name, entry in report["profiles"].items():
        ratio = report["ratios"].get(name)
        shown = "1.00" if ratio is None else f"{ratio['trace_switch_seconds']:.2f}"
        rows.append(
            [
                name,
                f"{entry['switch_gb_per_s']:.0f}",
                f"{entry['per_switch_s'] * 1e3:.1f}",
                str(entry["hbm_capacity_experts"]),
                str(entry["switches"]),
                f"{entry['switch_seconds']:.1f}",
                shown,
            ]
        )
    _print_table(rows)
    print("\n".join(report["explanation"]))
    _write_json(report, args.json)
    return 0


def _replay(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    profile = load_profile(args.profile)
    if args.shards is not None:
        profile = profile.with_shards(args.shards)
    expert_bytes: int | dict[str, int] = int(args.expert_gb * GB)
    if args.sizes:
        try:
            raw = json.loads(Path(args.sizes).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise SimulationError(f"cannot read sizes {args.sizes}: {error}") from None
        if not isinstance(raw, dict) or not all(isinstance(v, int) for v in raw.values()):
            raise SimulationError(f"{args.sizes} must map expert names to byte counts")
        expert_bytes = raw
    speed: float | Literal["roofline"] | None = "roofline" if args.roofline else args.tokens_per_s
    result = simulate(
        trace,
        profile,
        args.policy,
        expert_bytes=expert_bytes,
        pinned=args.pin,
        tokens_per_s=speed,
        default_output_tokens=args.output_tokens,
    )
    keys = ["requests", "hits", "switches", "evictions", "hit_rate", "bytes_moved"]
    keys += ["switch_seconds", "compute_seconds", "busy_seconds", "total_seconds"]
    data = result.to_dict()
    _print_table(
        [
            ["profile", "policy", *keys],
            [profile.name, result.policy]
            + [f"{data[k]:.4g}" if isinstance(data[k], float) else str(data[k]) for k in keys],
        ]
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _write_json(data, args.json)
    return 0


def _generate(args: argparse.Namespace) -> int:
    trace = zipf_trace(
        args.requests,
        args.experts,
        args.zipf_s,
        rate_per_s=args.rate,
        seed=args.seed,
        output_tokens=args.output_tokens,
    )
    print(f"wrote {write_jsonl(trace, args.out)} ({len(trace)} requests)")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m benchmarks.tier_sim.simulator",
        description="Replay request traces against memory-tier profiles.",
    )
    commands = root.add_subparsers(dest="command", required=True)
    paper = commands.add_parser("paper", help="the SN40L paper's 150 x 7B switching comparison")
    paper.add_argument("--json", help="write the full report here")
    paper.add_argument("--experts", type=int, default=150)
    paper.add_argument("--params-b", type=float, default=7.0)
    paper.add_argument("--requests", type=int, default=2000)
    paper.add_argument("--zipf-s", type=float, default=1.0, help="0 = uniform")
    paper.add_argument("--policy", choices=POLICY_NAMES, default="lru")
    paper.add_argument("--seed", type=int, default=0)
    paper.set_defaults(handler=_paper)
    replay = commands.add_parser("replay", help="replay a trace file on one profile")
    replay.add_argument("--trace", required=True, help=".jsonl or .csv")
    replay.add_argument("--profile", required=True, help="shipped name or YAML path")
    replay.add_argument("--policy", choices=POLICY_NAMES, default="lru")
    replay.add_argument("--expert-gb", type=float, default=14.0, help="size of every expert")
    replay.add_argument("--sizes", help="JSON file: expert name -> bytes (overrides --expert-gb)")
    replay.add_argument("--shards", type=int, help="override the profile's expert_shards")
    replay.add_argument("--pin", action="append", default=[], help="pinned expert (repeatable)")
    replay.add_argument("--tokens-per-s", type=float, help="decode speed for compute time")
    replay.add_argument("--roofline", action="store_true", help="decode speed = HBM BW / bytes")
    replay.add_argument("--output-tokens", type=int, default=0, help="when the trace has none")
    replay.add_argument("--json", help="write the result here")
    replay.set_defaults(handler=_replay)
    generate = commands.add_parser("generate", help="write a seeded Zipf trace as JSONL")
    generate.add_argument("--out", required=True)
    generate.add_argument("--experts", type=int, default=150)
    generate.add_argument("--requests", type=int, default=2000)
    generate.add_argument("--zipf-s", type=float, default=1.0, help="0 = uniform")
    generate.add_argument("--rate", type=float, default=1.0, help="mean requests per second")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--output-tokens", type=int)
    generate.set_defaults(handler=_generate)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except (SimulationError, ProfileError, TraceError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    raise SystemExit(main())
