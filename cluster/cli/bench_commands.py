"""`coe bench load|compare|ramp|soak|scale`: the load-test harness and benchmarks, from the shell.

Each subcommand forwards its arguments to the benchmark module of the same name
(`python -m benchmarks.<name>`), so both spellings take the same options.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

BENCHMARKS = {
    "load": "load-test a running cluster (open or closed loop, real prompts, JSON + plot)",
    "compare": "coe vs multiplex vs resident under the same load, in one run",
    "ramp": "replicas following a low-high-low load under the expert autoscaling policy",
    "soak": "good, bad and cancelled requests for a while: errors by kind and memory growth",
    "scale": "150 experts on executors vs multiplex vs scale-to-zero: switches, TTFT, processes",
}


def _run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"benchmarks.{args.bench_command}")
    forwarded = list(args.bench_args)
    if forwarded[:1] == ["--"]:
        forwarded = forwarded[1:]
    code: int = module.main(forwarded)
    return code


def add_bench_commands(commands: Any) -> None:
    bench = commands.add_parser("bench", help="load tests and benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    for name, help_text in BENCHMARKS.items():
        sub = bench_commands.add_parser(
            name, help=f"{help_text} (`coe bench {name} -- --help` for its options)"
        )
        sub.add_argument("bench_args", nargs=argparse.REMAINDER)
        sub.set_defaults(run=_run)
