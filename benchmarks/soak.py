"""Soak: mixed good, bad and cancelled traffic for a while; errors by kind and memory growth.

    .venv/bin/python -m benchmarks.soak --duration 600 --rate 1 --json soak.json
    .venv/bin/python -m benchmarks.soak --url http://127.0.0.1:8000 --duration 600 --rate 1 \\
        --json soak.json

Without `--url` it starts a local Ray + Serve on loopback with `--config` (the demo
config by default), soaks it and stops it; with `--url` it soaks a cluster already
running on this machine (loopback only), whose limits and application name `--config`
must describe. Arrivals are Poisson at `--rate`; each request is, seeded:

- good: routed (`model: coe`) or named (an expert from /v1/models, Zipf popularity),
  streamed or not; a named request must be answered by the expert it named;
- bad: invalid JSON, an unknown model, an over-long prompt, max_tokens over the limit,
  wrong types; each must get its own 4xx (400, 404, 400, 400, 400) and an error body;
- cancel: a stream the client closes after its first content chunk.

Outcomes: `ok`; `overloaded` (a 429: a polite refusal, counted but not a failure);
failures are `unexpected_status` (a 5xx, a bad request accepted or refused with another
code, a good one refused), `transport` (timeout, connection, malformed answer, an error
event in a stream) and `wrong_expert`. `not_sent`: more than `--max-in-flight` requests
were unanswered. Latency percentiles are over good requests answered in full.

Memory, sampled after a warm-up (one request per expert and one routed) and then every
`--sample-s` seconds: the summed PSS of the application's replica processes, of Serve's
proxy and controller, and the bytes in Ray's object store (when the soak started the
cluster, or with `--ray-address`; null otherwise). Growth is the last sample minus the
first. Exit status: 0 without failures, 1 with failures, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import workload
from benchmarks.harness.client import check_loopback
from benchmarks.soak_plan import FAILURES, KINDS, Limits, Mix, SoakRequest, plan_soak, summarise
from benchmarks.soak_traffic import Target, fetch_experts, soak, warm_up
from cluster.console import progress as say


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from cluster.config import PROJECT_ROOT

    parser = argparse.ArgumentParser(
        prog="coe bench soak",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, required=True, help="seconds of traffic")
    parser.add_argument("--rate", type=float, required=True, help="requests per second, all kinds")
    parser.add_argument("--url", default=None, help="a running cluster (default: start one)")
    parser.add_argument(
        "--config",
        type=Path,
        default=PROJECT_ROOT / "configs" / "demo.yaml",
        help="the cluster's config: its limits, application name (and what to start)",
    )
    parser.add_argument("--bad", type=float, default=Mix.bad, help="share of bad requests")
    parser.add_argument("--cancel", type=float, default=Mix.cancel, help="share of cancels")
    parser.add_argument("--stream", type=float, default=Mix.stream, help="share of good streamed")
    parser.add_argument("--routed", type=float, default=Mix.routed, help="share sent to 'coe'")
    parser.add_argument("--zipf", type=float, default=1.0, help="named experts' popularity skew")
    parser.add_argument("--prompts", type=Path, nargs="*", default=None, help="JSONL files")
    parser.add_argument("--max-tokens", type=int, default=16, help="per good request")
    parser.add_argument(
        "--cancel-max-tokens", type=int, default=128, help="per cancel (capped by the limit)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request bound, s")
    parser.add_argument("--sample-s", type=float, default=30.0, help="memory sampling interval")
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument(
        "--ray-address",
        default=None,
        help="with --url: the Ray cluster to read the object store's bytes from (e.g. 'auto'; "
        "set RAY_AUTH_MODE=token if it uses token auth); without it that figure is null",
    )
    parser.add_argument("--api-key-env", default="COE_API_KEY", help="sent as a Bearer key if set")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--port", type=int, default=0, help="Serve port when starting (0: free)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", type=Path, required=True, help="where to write the report")
    args = parser.parse_args(argv)
    for name in ("duration", "rate", "timeout", "sample_s"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("max_tokens", "cancel_max_tokens", "max_in_flight"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.url is not None:
        try:
            args.url = check_loopback(args.url)
        except ValueError as error:
            parser.error(f"--url: {error}")
    try:
        args.mix = Mix(args.bad, args.cancel, args.stream, args.routed)
    except ValueError as error:
        parser.error(str(error))
    return args


@contextmanager
def local_cluster(config: Any, port: int) -> Iterator[str]:
    """The config's application on a fresh local Ray + Serve (loopback); yields its URL."""
    from benchmarks.startup import free_port
    from benchmarks.systems import serve_instance
    from cluster.serve import lifecycle
    from cluster.setup_steps import prepare_checkpoints

    checkpoints = prepare_checkpoints(config, progress=say)
    with serve_instance(port or free_port()) as base_url:
        say(f"starting {config.serve.app_name} at {base_url}")
        lifecycle.deploy(config, checkpoints)
        try:
            yield base_url
        finally:
            lifecycle.undeploy(config.serve.app_name, config)


async def run_soak(
    args: argparse.Namespace, target: Target, prompts: list[str]
) -> tuple[dict[str, Any], list[SoakRequest]]:
    async with httpx.AsyncClient(trust_env=False, timeout=args.timeout) as http:
        experts = await fetch_experts(http, target)
        plan = plan_soak(prompts, experts, args.rate, args.duration, args.mix, args.seed, args.zipf)
        if not args.no_warmup:
            say(f"warming up {len(experts)} experts")
            await warm_up(http, target, experts, max(args.timeout, 300.0))
    say(f"soak: {len(plan)} requests over {args.duration:.0f}s at {args.rate}/s")
    outcomes, wall_s, samples = await soak(
        target,
        plan,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        sample_s=args.sample_s,
        cancel_max_tokens=args.cancel_max_tokens,
        max_in_flight=args.max_in_flight,
        progress=not args.no_progress,
    )
    return summarise(outcomes, wall_s, samples), plan


def print_table(report: dict[str, Any]) -> None:
    print(f"{'kind':<7} {'requests':>8} {'ok':>6} {'429':>5} {'failures':>8} {'not sent':>8}")
    for kind in KINDS:
        results = report["results"][kind]
        failures = sum(results[r] for r in FAILURES)
        print(
            f"{kind:<7} {report['by_kind'][kind]:8d} {results['ok']:6d} "
            f"{results['overloaded']:5d} {failures:8d} {results['not_sent']:8d}"
        )
    latency = report["good_latency"]

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    print(f"good latency p50 {fmt(latency['p50_s'])} s  p99 {fmt(latency['p99_s'])} s")
    memory = report["memory"]
    if memory["start"] is not None:
        print(
            f"memory start {memory['start']['total_bytes'] / 1e9:.3f} GB  "
            f"end {memory['end']['total_bytes'] / 1e9:.3f} GB  "
            f"growth {memory['growth_bytes'] / 1e6:+.1f} MB"
        )
        grown = memory.get("replica_growth_by_deployment") or {}
        if grown:
            parts = ", ".join(f"{name} {delta / 1e6:+.1f}" for name, delta in grown.items())
            print(f"replica growth outside the object store, MB: {parts}")


def main(argv: list[str] | None = None) -> int:
    from cluster.config import load_config

    args = parse_args(argv)
    try:
        config = load_config(args.config)
        prompts = workload.load_prompts(args.prompts or workload.default_prompt_files())
    except ValueError as error:
        say(f"error: {error}")
        return 2
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    limits = Limits(config.serve.max_prompt_chars, config.serve.max_tokens_limit)
    if args.max_tokens > limits.max_tokens_limit:
        say(f"error: --max-tokens {args.max_tokens} exceeds the server's {limits.max_tokens_limit}")
        return 2
    # A good request must be one the server accepts: prompts over its limit are left out.
    prompts = [p for p in prompts if len(p) <= limits.max_prompt_chars]
    if not prompts:
        say(f"error: no prompt is within the server's {limits.max_prompt_chars} characters")
        return 2
    started = time.monotonic()

    def soak_at(url: str) -> tuple[dict[str, Any], list[SoakRequest]]:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        target = Target(url, config.serve.app_name, limits, headers, args.ray_address)
        return asyncio.run(run_soak(args, target, prompts))

    try:
        if args.url is not None:
            report, plan = soak_at(args.url)
        else:
            with local_cluster(config, args.port) as url:
                report, plan = soak_at(url)
    except (httpx.HTTPError, RuntimeError, ValueError) as error:
        say(f"error: {type(error).__name__}: {error}")
        return 1
    report["settings"] = {
        "url": args.url or "local",
        "config": str(args.config),
        "app_name": config.serve.app_name,
        "duration_s": args.duration,
        "rate_rps": args.rate,
        "mix": asdict(args.mix),
        "zipf_s": args.zipf,
        "max_tokens": args.max_tokens,
        "cancel_max_tokens": args.cancel_max_tokens,
        "timeout_s": args.timeout,
        "limits": asdict(limits),
        "planned": len(plan),
        "seed": args.seed,
        "total_wall_s": time.monotonic() - started,
        "command": "python -m benchmarks.soak "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    say(f"wrote {args.json}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
