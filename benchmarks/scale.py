"""Many experts on a few processes: the CoE executors against multiplexing and scale-to-zero.

    .venv/bin/python -m benchmarks.scale --json benchmarks/results/scale.json

N experts (default 150), each with weights of its own: the demo's real checkpoints as
the most popular ones where they fit the device arena, small synthetic Llamas for the
rest (benchmarks/scale_experts.py). Real prompts (`../shared/data/prompts`, less those
every system would refuse alike: over the cluster's character limit or an expert's
context window), Zipf(s) popularity, open-loop Poisson arrivals, short answers
(`--max-tokens 8`) so that switching, not decoding, is what is measured. The systems,
each started and stopped in turn on one Ray instance and offered the same arrivals:

- `coe`: every expert on `--executors` executor replicas, over the memory tiers: the
  weights in the object store, an arena that holds `--hbm-experts` synthetic ones.
- `multiplex`: Ray Serve's `@serve.multiplexed`, loader `from_pretrained`, `--k` models
  per replica (default: the arena's experts shared out), as many replicas as executors.
- `zero`: a deployment per expert scaled to zero; the first request for an expert
  starts its process. A process start takes seconds, so `zero` gets an evenly spaced
  sample of `--zero-requests` of the arrivals (their planned times kept): that bounds
  the processes it starts to the experts those requests name.

Per system: TTFT and total latency for requests whose expert was held ready when sent
and for the others (see benchmarks/scale_metrics.py), switch overhead, switches,
goodput under the SLO, errors, replica processes and their peak PSS (with and without
the object store); for `coe` also the copy bound, spilled switches and, with
`--scaling`, the same figures at other N. A sample of answers (`--reference-sample`,
half of them non-resident) is compared with the expert loaded whole (greedy). Writes
the JSON and a PNG beside it, and prints the table and the goals, met or not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from benchmarks import scale_report
from benchmarks.harness import workload
from benchmarks.scale_experts import (
    ExpertSet,
    ReferenceCheck,
    build_experts,
    prompts_that_fit,
    reference_answers,
)
from benchmarks.scale_metrics import copyto_bandwidth
from benchmarks.scale_run import RunSettings, SystemRun, ray_instance, run_system
from benchmarks.startup import free_port
from benchmarks.systems import Scenario
from cluster.config import ServeSettings
from cluster.console import progress as say

SCALE_SYSTEMS = ("coe", "multiplex", "zero")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--experts", type=int, default=150, help="experts every system serves (N)")
    add("--real-experts", type=int, default=2, help="real checkpoints, where they fit the arena")
    add("--hbm-experts", type=int, default=4, help="experts the coe arena holds")
    add("--executors", type=int, default=2, help="coe executors = multiplex replicas")
    add("--max-experts-per-replica", type=int, default=None, help="coe executors' cache")
    add("--k", type=int, default=None, help="multiplex models per replica")
    add("--zipf", type=float, default=1.0, help="popularity skew s")
    add("--rate", type=float, default=2.0, help="offered load, requests/s")
    add("--duration", type=float, default=120.0, help="seconds of arrivals")
    add("--max-tokens", type=int, default=8, help="tokens per answer")
    add("--stream-fraction", type=float, default=1.0, help="share of streamed requests")
    add("--slo-s", type=float, default=1.0, help="total-latency SLO of goodput")
    add("--slo-ttft-s", type=float, default=None, help="optional TTFT SLO of goodput")
    add("--timeout", type=float, default=60.0, help="per-request timeout, s")
    add("--zero-requests", type=int, default=10, help="arrivals sampled for zero")
    add("--zero-timeout", type=float, default=180.0, help="zero's per-request timeout, s")
    add("--zero-idle-s", type=float, default=60.0, help="zero: idle seconds before 1 -> 0")
    add("--reference-sample", type=int, default=10, help="answers checked per system")
    add("--scaling", default="20,150", help="N values whose coe processes and PSS are reported")
    add("--scaling-duration", type=float, default=60.0, help="seconds of arrivals at other N")
    add("--systems", default=",".join(SCALE_SYSTEMS), help=f"subset of {SCALE_SYSTEMS}")
    add("--object-store-gb", type=float, default=None, help="Ray object store size")
    add("--gpu-share", type=float, default=0.0, help="GPU per replica (0: CPU only)")
    add("--watch-interval", type=float, default=0.25, help="residency poll interval, s")
    add("--prompts", type=Path, nargs="*", default=None, help="JSONL prompt files")
    add("--seed", type=int, default=0)
    add("--port", type=int, default=0, help="Serve HTTP port (0: a free one)")
    add("--json", type=Path, required=True, help="where to write the results")
    add("--plot", type=Path, default=None, help="the PNG (default: beside the JSON)")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SCALE_SYSTEMS]
    if unknown or not args.systems:
        parser.error(f"--systems: unknown {unknown}; choose from {list(SCALE_SYSTEMS)}")
    try:
        args.scaling = sorted({int(n) for n in args.scaling.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--scaling: expected N,N,... got {args.scaling!r}")
    for name in ("rate", "duration", "slo_s", "timeout", "zero_timeout", "watch_interval"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("max_tokens", "executors", "hbm_experts", "zero_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.experts < 2 or any(n < 2 for n in args.scaling):
        parser.error("--experts and every --scaling N must be >= 2")
    if not 0 <= args.gpu_share <= 1:
        parser.error(f"--gpu-share must be in [0, 1], got {args.gpu_share}")
    args.k = args.k or max(1, args.hbm_experts // args.executors)
    return args


def scenario_for(args: argparse.Namespace, experts: ExpertSet, count: int) -> Scenario:
    """The first `count` experts of `experts`, in rank order, sharing its arena."""
    dirs = experts.dirs[:count]
    return Scenario(
        experts=count,
        hbm_experts=args.hbm_experts,
        checkpoint=dirs[-1],
        copies_dir=dirs[-1].parent,
        max_models=args.k,
        expert_dirs=dirs,
        budget_bytes=experts.arena_bytes,
        executor_replicas=args.executors,
        max_experts_per_replica=args.max_experts_per_replica,
        multiplex_replicas=args.executors,
        zero_idle_s=args.zero_idle_s,
        gpu_share=args.gpu_share,
    )


def plan_for(
    args: argparse.Namespace, prompts: list[str], names: list[str], duration_s: float
) -> workload.Workload:
    return workload.open_loop(
        prompts,
        names,
        rate=args.rate,
        duration_s=duration_s,
        zipf_s=args.zipf,
        stream_fraction=args.stream_fraction,
        seed=args.seed,
    )


def evenly(items: list[Any], count: int) -> list[Any]:
    """`count` items spread evenly over `items` (all of them when there are fewer)."""
    if count >= len(items):
        return list(items)
    return [items[int((i + 0.5) * len(items) / count)] for i in range(count)]


def zero_sample(plan: workload.Workload, count: int) -> workload.Workload:
    """An evenly spaced sample of `plan`'s arrivals, at their planned times."""
    return replace(plan, requests=tuple(evenly(list(plan.requests), count)))


def reference_sample(run: SystemRun, count: int) -> list[int]:
    """Positions of successful outcomes to check: half non-resident, half resident
    (evenly spaced within each), the other kind filling in when one runs short."""
    ok = [i for i, o in enumerate(run.outcomes) if o.ok]
    other = [i for i in ok if not run.flags[i]]
    held = [i for i in ok if run.flags[i]]
    first = evenly(other, max(count // 2, count - len(held)))
    return sorted(first + evenly(held, count - len(first)))


def check_answers(
    runs: dict[str, SystemRun],
    plan: workload.Workload,
    scenario: Scenario,
    args: argparse.Namespace,
) -> None:
    """Compare a sample of each system's answers with the experts loaded whole; the
    verdicts go into each system's summary (`mismatches`, `reference_checks`)."""
    planned = {p.index: p for p in plan.requests}
    rank = {name: position for position, name in enumerate(scenario.names, start=1)}
    samples = {
        name: [run.outcomes[i] for i in reference_sample(run, args.reference_sample)]
        for name, run in runs.items()
        if run.outcomes
    }
    wanted = {
        (o.expert, rank[o.expert], planned[o.index].prompt)
        for outcomes in samples.values()
        for o in outcomes
    }
    references = reference_answers(wanted, scenario.checkpoints(), args.max_tokens, say)
    for name, outcomes in samples.items():
        checks = [
            ReferenceCheck(
                o.index, o.expert, o.text, references[(o.expert, planned[o.index].prompt)]
            )
            for o in outcomes
        ]
        summary = runs[name].summary
        summary["mismatches"] = sum(not check.matches for check in checks)
        summary["reference_checks"] = [check.to_dict() for check in checks]


def run_scale(
    args: argparse.Namespace, prompts: list[str]
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    started = time.monotonic()
    largest = max(args.experts, *args.scaling)
    experts = build_experts(largest, args.real_experts, args.hbm_experts, say)
    scenario = scenario_for(args, experts, args.experts)
    # Every synthetic expert has the same architecture: one of them speaks for all.
    kinds = {*experts.real, experts.dirs[-1]}
    loaded, prompts = len(prompts), prompts_that_fit(prompts, kinds, args.max_tokens)
    say(f"{len(prompts)} prompts fit every context window ({loaded - len(prompts)} left out)")
    plan = plan_for(args, prompts, scenario.names, args.duration)
    sizes = scenario.expert_sizes()
    typical = int(statistics.median(sizes.values()))
    bandwidth = copyto_bandwidth(typical)
    say(f"numpy.copyto of {typical / 2**20:.1f} MiB: {bandwidth / 1e9:.2f} GB/s")
    settings = RunSettings(
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        slo_s=args.slo_s,
        slo_ttft_s=args.slo_ttft_s,
        watch_interval_s=args.watch_interval,
        warm_experts=min(args.experts, max(args.hbm_experts, args.k * args.executors)),
    )
    store = int(args.object_store_gb * 1e9) if args.object_store_gb else None
    runs: dict[str, SystemRun] = {}
    scaling: dict[int, SystemRun] = {}
    with ray_instance(args.port or free_port(), store) as endpoints:
        capacity = ray.cluster_resources().get("object_store_memory")
        for name in args.systems:
            if name == "zero":
                zero = replace(settings, timeout_s=args.zero_timeout)
                sample = zero_sample(plan, args.zero_requests)
                runs[name] = run_system(name, scenario, sample, zero, endpoints, say, bandwidth)
            else:
                runs[name] = run_system(name, scenario, plan, settings, endpoints, say, bandwidth)
        for n in args.scaling if "coe" in args.systems else []:
            if n != args.experts:
                small = scenario_for(args, experts, n)
                small_plan = plan_for(args, prompts, small.names, args.scaling_duration)
                scaling[n] = run_system(
                    "coe", small, small_plan, settings, endpoints, say, bandwidth
                )
    if "coe" in runs and args.experts in args.scaling:
        scaling[args.experts] = runs["coe"]
    check_answers(runs, plan, scenario, args)
    systems = {name: run.summary for name, run in runs.items()}
    rows = [
        {
            "experts": n,
            "processes": run.summary["processes"],
            "peak_pss_outside_store_bytes": run.summary["peak_pss_outside_store_bytes"],
            "peak_pss_bytes": run.summary["peak_pss_bytes"],
            "peak_pss_outside_store_by_deployment": run.summary[
                "peak_pss_outside_store_by_deployment"
            ],
        }
        for n, run in sorted(scaling.items())
        if "failed" not in run.summary
    ]
    ratio_values = scale_report.ratios(systems)
    results = {
        "scenario": {
            "experts": args.experts,
            "real_experts": args.real_experts,
            "experts_built": experts.describe(),
            "hbm_experts": args.hbm_experts,
            "hbm_budget_bytes": scenario.hbm_budget_bytes,
            "expert_bytes": {
                "min": min(sizes.values()),
                "max": max(sizes.values()),
                "total": sum(sizes.values()),
            },
            "executors": args.executors,
            "max_experts_per_replica": args.max_experts_per_replica,
            "multiplex_k": args.k,
            "multiplex_replicas": args.executors,
            "zipf_s": args.zipf,
            "rate_rps": args.rate,
            "duration_s": args.duration,
            "prompts": {"fitting": len(prompts), "over_context_window": loaded - len(prompts)},
            "requests": len(plan),
            "zero_requests": min(args.zero_requests, len(plan)),
            "zero_idle_s": args.zero_idle_s,
            "max_tokens": args.max_tokens,
            "stream_fraction": args.stream_fraction,
            "slo_s": args.slo_s,
            "slo_ttft_s": args.slo_ttft_s,
            "timeout_s": args.timeout,
            "zero_timeout_s": args.zero_timeout,
            "object_store_bytes": store,
            "object_store_capacity_bytes": capacity,
            "seed": args.seed,
            "copyto_bytes": typical,
            "copyto_bytes_per_s": bandwidth,
            "command": "python -m benchmarks.scale " + " ".join(sys.argv[1:]),
        },
        "systems": systems,
        "scaling": rows,
        "ratios": ratio_values,
        "goals": scale_report.goals(systems, ratio_values, rows),
        "wall_s": time.monotonic() - started,
    }
    latencies = {
        name: sorted(o.ttft_s for o in run.outcomes if o.ok and o.ttft_s is not None)
        for name, run in runs.items()
    }
    return results, latencies


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        loaded = workload.load_prompts(args.prompts or workload.default_prompt_files())
    except ValueError as error:  # a bad prompt file: nothing was started
        say(f"error: {error}")
        return 2
    # Every system refuses a conversation over the cluster's limit alike (a 400): such
    # prompts would measure the limit, not the system.
    limit = ServeSettings().max_prompt_chars
    prompts = [prompt for prompt in loaded if len(prompt) <= limit]
    if not prompts:
        say(f"error: no prompt of at most {limit} characters")
        return 2
    say(f"{len(prompts)} prompts ({len(loaded) - len(prompts)} over {limit} characters left out)")
    results, latencies = run_scale(args, prompts)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    plot = args.plot or args.json.with_suffix(".png")
    scale_report.plot_scale(results, latencies, plot)
    scale_report.print_table(results)
    say(f"wrote {args.json} and {plot} in {results['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
