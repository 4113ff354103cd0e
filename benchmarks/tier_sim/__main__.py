"""The tier simulator's command line: `python -m benchmarks.tier_sim paper|replay|generate`.

- ``paper``: the SN40L paper's 150 x 7B switching comparison (`paper_comparison`);
- ``replay``: replay a trace file on one hardware profile (`simulator.simulate`);
- ``generate``: write a seeded Zipf trace as JSONL (`trace.zipf_trace`).

`coe tiers simulate -- ...` forwards its arguments here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from benchmarks.tier_sim.paper_comparison import paper_comparison
from benchmarks.tier_sim.profiles import GB, ProfileError, load_profile
from benchmarks.tier_sim.simulator import SimulationError, simulate
from benchmarks.tier_sim.trace import TraceError, load_trace, write_jsonl, zipf_trace
from memory_tiers.eviction import POLICY_NAMES


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
        prog="python -m benchmarks.tier_sim",
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
