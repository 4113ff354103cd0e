"""guidellm and this project's harness on the same prompts and rate, side by side.

    .venv/bin/python -m benchmarks.guidellm_agreement --rate 0.25 --count 20 \\
        --json benchmarks/results/guidellm_agreement_poisson.json
    .venv/bin/python -m benchmarks.guidellm_agreement --synchronous --count 20 \\
        --json benchmarks/results/guidellm_agreement_synchronous.json

Two independent load generators measure one running cluster (loopback only): first the
harness (`benchmarks/harness`), then guidellm (the vLLM project's serving benchmark),
each sending the same `--count` prompts, in the same order, as streamed routed chat
completions (`model: coe`, greedy, `--max-tokens`), at Poisson arrivals of `--rate`/s
(each tool draws its own arrival times) or one at a time (`--synchronous`). Both time
to the first content chunk (TTFT) and to the end of the answer (latency); the summary
puts their percentiles, and the rate each actually sent at, side by side. guidellm runs
offline: its tokenizer is the demo SmolLM2 checkpoint's (`--processor`), its data a JSONL
file of the prompts; its own report is kept beside the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import driver, stats, workload
from benchmarks.harness.client import check_loopback
from benchmarks.harness.workload import PROJECT_ROOT
from cluster.config import load_config
from cluster.console import progress as say

GUIDELLM_TIMEOUT_S = 1800
DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.guidellm_agreement",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="cluster base URL")
    parser.add_argument("--rate", type=float, default=0.5, help="Poisson arrivals per second")
    parser.add_argument(
        "--synchronous",
        action="store_true",
        help="instead of --rate: one request at a time, the next when the last is answered",
    )
    parser.add_argument("--count", type=int, default=20, help="requests per tool")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=Path, nargs="*", default=None, help="JSONL files")
    parser.add_argument("--seed", type=int, default=0, help="which prompts, which arrivals")
    parser.add_argument("--max-prompt-chars", type=int, default=2000, help="longest prompt to draw")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, s")
    parser.add_argument("--processor", type=Path, default=None, help="tokenizer directory")
    parser.add_argument("--json", type=Path, required=True, help="where to write the summary")
    args = parser.parse_args(argv)
    if not args.rate > 0:
        parser.error(f"--rate must be > 0, got {args.rate}")
    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    try:
        args.url = check_loopback(args.url)
    except ValueError as error:
        parser.error(f"--url: {error}")
    return args


def demo_tokenizer_dir() -> Path:
    """The demo SmolLM2 checkpoint's directory, which holds its tokenizer."""
    return load_config(DEMO_CONFIG).resolved_cache_dir() / "smollm2-135m-instruct"


def choose_prompts(files: list[Path], count: int, seed: int, max_chars: int) -> list[str]:
    """`count` distinct prompts of at most `max_chars` characters, drawn by `seed` (all
    of them, in order, when fewer). The bound keeps every prompt within the server's
    `max_prompt_chars`, so a refusal never counts against either tool."""
    prompts = [p for p in workload.load_prompts(files) if len(p) <= max_chars]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(prompts))[:count]
    return [prompts[int(i)] for i in order]


def harness_plan(
    prompts: list[str], rate: float, seed: int, synchronous: bool
) -> workload.Workload:
    """The prompts in order, streamed, at Poisson arrivals of `rate` (or one at a time)."""
    if synchronous:
        return workload.Workload(
            requests=tuple(
                workload.Planned(index=i, at_s=None, expert="coe", prompt=prompt, stream=True)
                for i, prompt in enumerate(prompts)
            ),
            mode="closed",
            seed=seed,
            users=1,
        )
    arrivals = workload.poisson_arrivals(rate, len(prompts), None, np.random.default_rng(seed))
    planned = tuple(
        workload.Planned(index=i, at_s=at, expert="coe", prompt=prompt, stream=True)
        for i, (at, prompt) in enumerate(zip(arrivals, prompts, strict=True))
    )
    return workload.Workload(
        requests=planned, mode="open", seed=seed, rate=rate, span_s=arrivals[-1]
    )


def run_harness(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    plan = harness_plan(prompts, args.rate, args.seed, args.synchronous)
    result = driver.run_sync(
        plan,
        args.url,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        concurrency=1 if args.synchronous else None,
        progress=False,
        model="coe",
    )
    ok = [o for o in result.outcomes if o.ok]
    return summary(
        ttft_s=[o.ttft_s for o in ok if o.ttft_s is not None],
        latency_s=[o.total_s for o in ok],
        starts_s=[o.started_s for o in result.outcomes],
        requests=len(result.outcomes),
        ok=len(ok),
    )


def summary(
    ttft_s: list[float], latency_s: list[float], starts_s: list[float], requests: int, ok: int
) -> dict[str, Any]:
    """The figures both tools are compared on, in seconds, and the rate the tool
    actually sent at (requests after the first, over the time from first to last send)."""
    span = max(starts_s) - min(starts_s) if len(starts_s) > 1 else 0.0
    figures: dict[str, Any] = {
        "requests": requests,
        "ok": ok,
        "sent_rps": (len(starts_s) - 1) / span if span > 0 else None,
    }
    for name, values in (("ttft", ttft_s), ("latency", latency_s)):
        for q in (50, 90, 99):
            figures[f"{name}_p{q}_s"] = stats.percentile(values, q)
        figures[f"{name}_mean_s"] = sum(values) / len(values) if values else None
    return figures


def guidellm_command(
    args: argparse.Namespace, data: Path, processor: Path, report: Path
) -> list[str]:
    """The guidellm run: the same prompts (in file order), rate and token budget, as
    streamed chat completions (guidellm's default request format)."""
    guidellm = Path(sys.executable).with_name("guidellm")
    return [
        str(guidellm),
        "run",
        "--backend",
        f"kind=openai_http,target={args.url},model=coe,max_tokens={args.max_tokens}",
        "--profile",
        "kind=synchronous" if args.synchronous else f"kind=poisson,rate={args.rate}",
        "--constraint",
        f"kind=max_requests,count={args.count}",
        "--tokenizer",
        f"kind=hf_auto,model={processor}",
        "--data",
        f"kind=json_file,path={data}",
        "--seed",
        f"kind=static,value={args.seed}",
        "--output",
        f"kind=json,path={report}",
        "--disable-console-interactive",
    ]


def offline_env() -> dict[str, str]:
    """guidellm's environment: no hub, no telemetry, loopback without a proxy."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    return env


def guidellm_requests(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every request of the one benchmark in a guidellm JSON report, with its status."""
    (benchmark,) = report["benchmarks"]
    found = []
    for status, requests in benchmark["requests"].items():
        for request in requests or []:
            found.append({**request, "status": status})
    return found


def run_guidellm(args: argparse.Namespace, prompts: list[str], workdir: Path) -> dict[str, Any]:
    data = workdir / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    processor = args.processor or demo_tokenizer_dir()
    report = workdir / "benchmarks.json"
    command = guidellm_command(args, data, processor, report)
    say("running " + " ".join(command))
    subprocess.run(command, env=offline_env(), check=True, timeout=GUIDELLM_TIMEOUT_S, cwd=workdir)
    # guidellm's own report is kept beside the summary.
    args.json.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(report, args.json.with_name(args.json.stem + "_guidellm_report.json"))
    requests = guidellm_requests(json.loads(report.read_text()))
    ok = [r for r in requests if r["status"] == "successful"]
    return summary(
        ttft_s=[r["time_to_first_token_ms"] / 1000 for r in ok],
        latency_s=[r["request_latency"] for r in ok],
        starts_s=[r["request_start_time"] for r in requests],
        requests=len(requests),
        ok=len(ok),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = args.prompts or workload.default_prompt_files()
    prompts = choose_prompts(files, args.count, args.seed, args.max_prompt_chars)
    pace = "one at a time" if args.synchronous else f"at {args.rate}/s"
    say(f"harness: {len(prompts)} prompts {pace}")
    ours = run_harness(args, prompts)
    with tempfile.TemporaryDirectory(prefix="coe-guidellm-") as workdir:
        theirs = run_guidellm(args, prompts, Path(workdir))
    result = {
        "url": args.url,
        "rate": None if args.synchronous else args.rate,
        "synchronous": args.synchronous,
        "count": args.count,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "harness": ours,
        "guidellm": theirs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'':14}{'harness':>10}{'guidellm':>10}")
    for key in ours:
        print(f"{key:14}{_cell(ours[key]):>10}{_cell(theirs[key]):>10}")
    return 0


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
