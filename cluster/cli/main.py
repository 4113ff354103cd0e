"""The `coe` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from actors.weights.build_lock import DEFAULT_WAIT_S
from actors.weights.checkpoint import CheckpointError
from cluster.cli.apply_command import add_apply_command
from cluster.cli.bench_commands import add_bench_commands
from cluster.cli.router_commands import CommandInputError, add_router_commands
from cluster.cli.status_command import add_status_command
from cluster.cli.tier_commands import ClusterUnavailable, add_tier_commands
from cluster.config import DEMO_SOURCES, ConfigError, load_config
from cluster.console import say

DEFAULT_CONFIG = "configs/demo.yaml"


def _serve(args: argparse.Namespace) -> int:
    from cluster.cli.serve_command import serve_foreground

    config = load_config(args.config)
    if args.port is not None:
        serve = config.serve.model_copy(update={"port": args.port})
        config = config.model_copy(update={"serve": serve})
    say(f"config {args.config}: {len(config.experts)} experts, {len(config.categories)} categories")
    return serve_foreground(config, say)


def _demo_build(args: argparse.Namespace) -> int:
    from actors.weights.demo import build_demo

    config = load_config(args.config)
    sources = args.source or sorted({e.demo_source for e in config.experts if e.demo_source})
    built = build_demo(config.resolved_cache_dir(), sources, say, args.wait_timeout)
    for name, directory in built.items():
        say(f"{name}: {directory}")
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _config_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    say(f"{args.config} is valid: experts {[e.name for e in config.experts]}")
    for category, expert in sorted(config.category_map.items()):
        say(f"  {category} -> {expert}")
    say(f"  below confidence {config.router.confidence_threshold} -> {config.generalist}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="coe", description="Composition-of-Experts cluster.")
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the CoE in the foreground (Ctrl-C stops)")
    serve.add_argument(
        "--config", default=DEFAULT_CONFIG, help="config YAML (default: %(default)s)"
    )
    serve.add_argument("--port", type=int, default=None, help="override serve.port")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="the embedded demo's weights")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    build = demo_commands.add_parser("build", help="convert the demo experts' weights (idempotent)")
    build.add_argument("--config", default=DEFAULT_CONFIG, help="config naming the cache dir")
    build.add_argument(
        "--source", action="append", choices=DEMO_SOURCES, help="only this source (repeatable)"
    )
    build.add_argument(
        "--wait-timeout",
        type=_seconds,
        default=DEFAULT_WAIT_S,
        metavar="SECONDS",
        help="longest wait for another build of the same cache (default: %(default)gs)",
    )
    build.set_defaults(run=_demo_build)

    config = commands.add_parser("config", help="configuration files")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config and print its routing")
    check.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="config YAML")
    check.set_defaults(run=_config_check)

    add_apply_command(commands)
    add_router_commands(commands)
    add_tier_commands(commands)
    add_status_command(commands)
    add_bench_commands(commands)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "port", None) is not None and not 1 <= args.port <= 65535:
        say(f"error: --port {args.port} is outside 1..65535")
        return 2
    try:
        code: int = args.run(args)
    except (ConfigError, CheckpointError, ClusterUnavailable, CommandInputError) as error:
        say(f"error: {error}")
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
