"""The CoE cluster against what users would run instead, under the same load, in one run.

    .venv/bin/python -m benchmarks.compare --experts 8 --hbm-experts 3 --zipf 1.0 \\
        --json benchmarks/results/compare.json

Starts one local Ray + Serve (loopback), then each system in turn (`coe`, `multiplex`,
`resident`; see benchmarks/systems.py), replays the same planned workload against it
(the same prompts, experts and Poisson arrival times, seeded), samples replicas and
residency every second, and stops it. The JSON holds each system's summary (latency
percentiles, goodput under the SLO, errors by kind, per-expert counts, switches, HBM hit
rate, memory, replicas over time) and the ratios of `coe` to the baselines; PNG plots
(latency CDF per system, replicas and residency over time) go beside it.

Before the timed run each system gets one warm-up request per expert, least popular
first, so every system starts from the same residency (the most popular experts most
recently used) and no first-request costs land in the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import scale_run
from benchmarks.harness import driver, plots, stats, workload
from benchmarks.startup import free_port
from benchmarks.systems import SYSTEMS, Scenario, demo_scenario, running, serve_instance
from cluster.console import progress as say


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--experts", type=int, default=8, help="experts every system serves")
    parser.add_argument(
        "--hbm-experts", type=int, default=3, help="experts the coe device budget holds"
    )
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity skew s (0: uniform)")
    parser.add_argument("--k", type=int, default=3, help="multiplex: models per replica")
    parser.add_argument(
        "--active-slots",
        type=int,
        default=None,
        help="coe: experts that may execute at once (default: as many as --hbm-experts)",
    )
    parser.add_argument("--rate", type=float, default=1.0, help="offered load, requests/s")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load each")
    parser.add_argument("--slo-s", type=float, default=6.0, help="total-latency SLO (goodput)")
    parser.add_argument("--slo-ttft-s", type=float, default=None, help="optional TTFT SLO")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument(
        "--stream-fraction", type=float, default=0.5, help="share of streaming requests"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s")
    parser.add_argument("--prompts", type=Path, nargs="*", default=None, help="JSONL prompt files")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="Serve HTTP port (0: a free one)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument(
        "--plots", type=Path, default=None, help="plot directory (default: beside the JSON)"
    )
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        parser.error(f"--systems: unknown {unknown}; choose from {list(SYSTEMS)}")
    args.systems = systems
    if not args.rate > 0:
        parser.error(f"--rate must be > 0, got {args.rate}")
    if not args.duration > 0:
        parser.error(f"--duration must be > 0, got {args.duration}")
    if not args.slo_s > 0:
        parser.error(f"--slo-s must be > 0, got {args.slo_s}")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return args


def warm_up(scenario: Scenario, base_url: str, max_tokens: int) -> None:
    """One request per expert, least popular first: every system starts alike."""
    scale_run.warm_up(list(reversed(scenario.names)), base_url, max_tokens)


def ratios(systems: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    coe = systems.get("coe", {})
    multiplex = systems.get("multiplex", {})
    resident = systems.get("resident", {})
    return {
        "coe_p99_over_multiplex": stats.ratio(coe.get("p99_s"), multiplex.get("p99_s")),
        "coe_goodput_over_multiplex": stats.ratio(
            coe.get("goodput_rps"), multiplex.get("goodput_rps")
        ),
        "coe_p50_over_resident": stats.ratio(coe.get("p50_s"), resident.get("p50_s")),
        "coe_memory_over_resident": stats.ratio(
            coe.get("peak_memory_bytes"), resident.get("peak_memory_bytes")
        ),
        "coe_host_memory_over_resident": stats.ratio(
            coe.get("peak_host_memory_bytes"), resident.get("peak_host_memory_bytes")
        ),
    }


def plan_compare(args: argparse.Namespace) -> tuple[Scenario, workload.Workload]:
    """Everything that can fail on bad input, before anything starts."""
    prompts = workload.load_prompts(args.prompts or workload.default_prompt_files())
    scenario = demo_scenario(
        args.experts, args.hbm_experts, say, max_models=args.k, active_slots=args.active_slots
    )
    plan = workload.open_loop(
        prompts,
        scenario.names,
        rate=args.rate,
        duration_s=args.duration,
        zipf_s=args.zipf,
        stream_fraction=args.stream_fraction,
        seed=args.seed,
    )
    return scenario, plan


def run_compare(
    args: argparse.Namespace, scenario: Scenario, plan: workload.Workload
) -> dict[str, Any]:
    say(
        f"workload: {len(plan)} requests over {args.duration:.0f}s at {args.rate}/s, "
        f"zipf s={args.zipf}, {args.experts} experts"
    )
    results: dict[str, dict[str, Any]] = {}
    timelines: dict[str, list[dict[str, Any]]] = {}
    latencies: dict[str, list[float]] = {}
    started = time.monotonic()
    with serve_instance(args.port or free_port()) as base_url:
        for name in args.systems:
            with running(name, scenario, say) as system:
                warm_up(scenario, base_url, args.max_tokens)
                say(f"[{name}] {len(plan)} requests")
                result = driver.run_sync(
                    plan,
                    base_url,
                    max_tokens=args.max_tokens,
                    timeout_s=args.timeout,
                    duration_s=args.duration + args.timeout,
                    progress=True,
                )
                summary = stats.summarise(result, args.slo_s, args.slo_ttft_s)
                summary.update(system.stats(len(result.outcomes)))
                summary["timeline"] = system.timeline.samples
                results[name] = summary
                timelines[name] = system.timeline.samples
                latencies[name] = stats.latency_series(result)
                say(
                    f"[{name}] p50 {summary['p50_s']} s, p99 {summary['p99_s']} s, "
                    f"goodput {summary['goodput_rps']:.3f}/s, errors {summary['errors']}"
                )
    return {
        "scenario": {
            "experts": args.experts,
            "hbm_experts": args.hbm_experts,
            "active_slots": scenario.active_slots or scenario.hbm_experts,
            "zipf_s": args.zipf,
            "k": args.k,
            "rate_rps": args.rate,
            "duration_s": args.duration,
            "slo_s": args.slo_s,
            "slo_ttft_s": args.slo_ttft_s,
            "max_tokens": args.max_tokens,
            "stream_fraction": args.stream_fraction,
            "seed": args.seed,
            "requests": len(plan),
            "expert_bytes": scenario.expert_bytes,
            "hbm_budget_bytes": scenario.hbm_budget_bytes,
            "command": "python -m benchmarks.compare " + " ".join(sys.argv[1:]),
        },
        "systems": results,
        "ratios": ratios(results),
        "wall_s": time.monotonic() - started,
        "_latencies": latencies,
        "_timelines": timelines,
    }


def print_table(results: dict[str, Any]) -> None:
    print(
        f"{'system':<10} {'p50 s':>8} {'p99 s':>8} {'goodput/s':>10} {'achieved/s':>10} "
        f"{'errors':>7} {'switches':>8} {'hit rate':>8} {'device GB':>9} {'host GB':>8}"
    )
    for name, s in results["systems"].items():

        def fmt(value: Any, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        print(
            f"{name:<10} {fmt(s['p50_s'], '8.3f')} {fmt(s['p99_s'], '8.3f')} "
            f"{s['goodput_rps']:10.3f} {s['achieved_rps']:10.3f} {s['error_count']:7d} "
            f"{s['switches']:8d} {s['hbm_hit_rate']:8.2f} "
            f"{s['peak_memory_bytes'] / 1e9:9.2f} {s['peak_host_memory_bytes'] / 1e9:8.2f}"
        )
    for key, value in results["ratios"].items():
        print(f"{key}: {'-' if value is None else f'{value:.3f}'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        scenario, plan = plan_compare(args)
    except ValueError as error:  # a bad prompt file or scenario: nothing was started
        say(f"error: {error}")
        return 2
    scenario.prepare(say)
    results = run_compare(args, scenario, plan)
    latencies = results.pop("_latencies")
    timelines = results.pop("_timelines")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    plot_dir = args.plots or args.json.parent
    stem = args.json.stem
    plots.plot_latency_cdf(latencies, plot_dir / f"{stem}_latency_cdf.png", args.slo_s)
    plots.plot_timeline(timelines, plot_dir / f"{stem}_timeline.png")
    print_table(results)
    say(f"wrote {args.json} and plots in {plot_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
