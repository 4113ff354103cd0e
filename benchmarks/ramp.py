"""Replicas following the load: the expert autoscaling policy under a ramp.

    .venv/bin/python -m benchmarks.ramp --json benchmarks/results/ramp.json

Runs the `coe` system (tiered placement, `policy: coe` on every expert) and offers a
piecewise-constant Poisson load: low, high, low, idle (`--phases`). Replicas of every
expert and the resident experts are sampled once a second; the JSON has the timeline,
the per-phase latency summary and, per phase, the most replicas any expert ran, so a
reader sees the scale-up under the high phase and the scale-down after it. A timeline
PNG goes beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.compare import warm_up
from benchmarks.harness import driver, stats, workload
from benchmarks.startup import free_port
from benchmarks.systems import demo_scenario, running, serve_instance
from cluster.console import progress as say

DEFAULT_PHASES = "40:0.3,90:3,90:0.3,40:0"


def parse_phases(text: str) -> list[tuple[float, float]]:
    """'seconds:rate,...' -> [(seconds, rate), ...]; errors name the bad part."""
    phases = []
    for part in text.split(","):
        try:
            seconds, rate = (float(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"bad phase {part!r}; expected SECONDS:RATE") from None
        if not seconds > 0 or rate < 0:
            raise ValueError(f"bad phase {part!r}: seconds must be > 0 and rate >= 0")
        phases.append((seconds, rate))
    return phases


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ramp", description=__doc__)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--hbm-experts", type=int, default=2)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--target-ongoing", type=float, default=1.0)
    parser.add_argument("--upscale-delay", type=float, default=2.0)
    parser.add_argument("--downscale-delay", type=float, default=20.0)
    parser.add_argument("--phases", default=DEFAULT_PHASES, help="SECONDS:RATE,... phases")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--slo-s", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        args.phases = parse_phases(args.phases)
    except ValueError as error:
        parser.error(f"--phases: {error}")
    if args.max_replicas < 1:
        parser.error(f"--max-replicas must be >= 1, got {args.max_replicas}")
    return args


def phase_of(t: float, phases: list[tuple[float, float]]) -> int:
    start = 0.0
    for number, (seconds, _rate) in enumerate(phases):
        start += seconds
        if t < start:
            return number
    return len(phases) - 1


def replicas_per_phase(
    samples: list[dict[str, Any]], phases: list[tuple[float, float]], offset_s: float
) -> list[dict[str, Any]]:
    """The most and the last replicas any expert ran in each phase."""
    rows: list[dict[str, Any]] = [
        {"seconds": s, "rate": r, "max_replicas": 0, "end_replicas": 0} for s, r in phases
    ]
    for sample in samples:
        t = sample["t"] - offset_s
        if t < 0:
            continue
        row = rows[phase_of(t, phases)]
        most = max(sample["replicas"].values(), default=0)
        row["max_replicas"] = max(row["max_replicas"], most)
        row["end_replicas"] = most
    return rows


def main(argv: list[str] | None = None) -> int:
    from benchmarks.harness.plots import plot_timeline

    args = parse_args(argv)
    try:
        prompts = workload.load_prompts(workload.default_prompt_files())
        scenario = demo_scenario(
            args.experts,
            args.hbm_experts,
            say,
            autoscaling=(
                ("policy", "coe"),
                ("idle", "park"),
                ("max_replicas", args.max_replicas),
                ("target_ongoing_requests", args.target_ongoing),
                ("upscale_delay_s", args.upscale_delay),
                ("downscale_delay_s", args.downscale_delay),
                ("look_back_period_s", 12.0),  # Serve wants it above its 10 s metrics interval
            ),
        )
        plan = workload.phased_open_loop(
            prompts, scenario.names, args.phases, zipf_s=args.zipf, seed=args.seed
        )
    except ValueError as error:
        say(f"error: {error}")
        return 2
    scenario.prepare(say)
    duration = sum(seconds for seconds, _ in args.phases)
    with serve_instance(free_port()) as base_url, running("coe", scenario, say) as system:
        warm_up(scenario, base_url, args.max_tokens)
        offset = system.elapsed_s()
        result = driver.run_sync(
            plan,
            base_url,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
            duration_s=duration + args.timeout,
        )
        samples = list(system.timeline.samples)
    summary = stats.summarise(result, args.slo_s)
    phases = replicas_per_phase(samples, args.phases, offset)
    timeline = [{**s, "t": s["t"] - offset} for s in samples]
    results: dict[str, Any] = {
        "command": "python -m benchmarks.ramp " + " ".join(sys.argv[1:]),
        "phases": phases,
        "summary": summary,
        "timeline": timeline,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    plot_timeline({"coe (ramp)": timeline}, args.json.with_suffix(".png"))
    print(f"{'phase s':>8} {'rate/s':>7} {'max replicas':>13} {'replicas at end':>16}")
    for row in phases:
        print(
            f"{row['seconds']:8.0f} {row['rate']:7.2f} {row['max_replicas']:13d} "
            f"{row['end_replicas']:16d}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
