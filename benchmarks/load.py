"""Load-test a running cluster (`coe bench load`): open or closed loop, from real prompts.

    .venv/bin/python -m benchmarks.load --rate 2 --duration 60 --slo-s 5 --json load.json
    .venv/bin/python -m benchmarks.load --users 4 --count 200 --routed --slo-s 5 --json load.json

Open loop (`--rate`): Poisson arrivals, each request sent at its time whatever the
answers do. Closed loop (`--users N`): N users, each sending its next request when its
last one is answered. Expert popularity is a Zipf(s) skew over the cluster's experts
(`--zipf`, the order of `--experts` is the rank order), or the cluster's own routing
(`--routed`: every request names model `coe`). The run stops by itself after
`--count` requests or `--duration` seconds, only talks to loopback addresses, and
writes a JSON summary and a latency CDF beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import driver, stats, workload
from benchmarks.harness.client import check_loopback
from cluster.console import progress as say


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="coe bench load",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="cluster base URL")
    loop = parser.add_mutually_exclusive_group(required=True)
    loop.add_argument("--rate", type=float, help="open loop: requests per second")
    loop.add_argument("--users", type=int, help="closed loop: concurrent users")
    parser.add_argument("--count", type=int, default=None, help="requests to send at most")
    parser.add_argument("--duration", type=float, default=None, help="seconds to run at most")
    popularity = parser.add_mutually_exclusive_group()
    popularity.add_argument("--zipf", type=float, default=1.0, help="popularity skew s")
    popularity.add_argument(
        "--routed", action="store_true", help="send model 'coe': the cluster routes"
    )
    parser.add_argument(
        "--experts",
        default=None,
        help="comma-separated, rank order (default: the cluster's /v1/models)",
    )
    parser.add_argument("--prompts", type=Path, nargs="*", default=None, help="JSONL files")
    parser.add_argument("--stream-fraction", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s")
    parser.add_argument("--slo-s", type=float, required=True, help="total-latency SLO")
    parser.add_argument("--slo-ttft-s", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", type=Path, required=True, help="where to write the summary")
    args = parser.parse_args(argv)
    if args.rate is not None and not args.rate > 0:
        parser.error(f"--rate must be > 0, got {args.rate}")
    if args.users is not None and args.users < 1:
        parser.error(f"--users must be >= 1, got {args.users}")
    if args.count is None and args.duration is None:
        parser.error("give --count, --duration or both: the run must stop by itself")
    if args.users is not None and args.count is None:
        parser.error("a closed loop needs --count")
    if not args.slo_s > 0:
        parser.error(f"--slo-s must be > 0, got {args.slo_s}")
    try:
        check_loopback(args.url)
    except ValueError as error:
        parser.error(f"--url: {error}")
    return args


def cluster_experts(url: str) -> list[str]:
    response = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=10.0)
    response.raise_for_status()
    return [m["id"] for m in response.json()["data"] if m["id"] != "coe"]


def build_workload(args: argparse.Namespace, experts: list[str]) -> workload.Workload:
    prompts = workload.load_prompts(args.prompts or workload.default_prompt_files())
    common: dict[str, Any] = {
        "zipf_s": args.zipf,
        "stream_fraction": args.stream_fraction,
        "seed": args.seed,
    }
    if args.rate is not None:
        return workload.open_loop(prompts, experts, args.rate, args.count, args.duration, **common)
    return workload.closed_loop(prompts, experts, args.users, args.count, **common)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.harness.plots import plot_latency_cdf

    args = parse_args(argv)
    try:
        experts = args.experts.split(",") if args.experts else cluster_experts(args.url)
        plan = build_workload(args, experts)
    except (ValueError, httpx.HTTPError) as error:
        say(f"error: {error}")
        return 2
    result = driver.run_sync(
        plan,
        args.url,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        duration_s=args.duration,
        concurrency=args.users,
        progress=not args.no_progress,
        model="coe" if args.routed else None,
    )
    summary = stats.summarise(result, args.slo_s, args.slo_ttft_s)
    summary["workload"] = plan.describe()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    plot_latency_cdf(
        {"cluster": stats.latency_series(result)},
        args.json.with_name(args.json.stem + "_latency_cdf.png"),
        args.slo_s,
    )
    print(
        f"requests {summary['requests']}  ok {summary['ok']}  errors {summary['errors']}\n"
        f"achieved {summary['achieved_rps']:.2f}/s  goodput {summary['goodput_rps']:.2f}/s  "
        f"p50 {summary['p50_s']}  p99 {summary['p99_s']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
