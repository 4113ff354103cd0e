"""`coe apply`: push a changed config to a running cluster.

Serve updates only what changed: unchanged experts, and an ingress whose arguments are
the same, keep running. The apply waits, up to `--timeout`, until the application runs
the new config; a config that validates but cannot deploy (a replica that fails to
start, or can never be placed) fails the command with the deployments concerned, and
never holds it forever. Who may call the cluster never changes by accident: the key
comes from the applying shell (`serve.api_key_env`), so an operator without it set
would turn authentication off. An apply that would turn it off, turn it on or change
the key says so and refuses unless `--change-api-key` is given.
"""

from __future__ import annotations

import argparse
from typing import Any

from cluster.cli.router_commands import CommandInputError
from cluster.cli.status_command import call_deployment
from cluster.cli.tier_commands import ClusterUnavailable
from cluster.config import CoEConfig, load_config
from cluster.console import say
from cluster.ingress.auth import key_fingerprint

INGRESS = "ingress"
CHANGE_FLAG = "--change-api-key"
# Long enough for new experts to be packed and their replicas to start on a slow node.
DEFAULT_TIMEOUT_S = 600.0


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive, finite number of seconds")
    return value


def api_key_change(running: str | None, applied: str | None, key_env: str | None) -> str | None:
    """What applying changes about the API key, given both fingerprints; None: nothing."""
    if running == applied:
        return None
    if applied is None:
        source = f"${key_env} is not set in this shell" if key_env else "it sets no key"
        return f"this config turns authentication OFF on the running cluster ({source})"
    if running is None:
        return "this config turns authentication ON: callers without the key are refused"
    return "this config CHANGES the API key: callers with the old key are refused"


def app_is_running(app_name: str) -> bool:
    from ray import serve

    return app_name in serve.status().applications


def check_key_change(config: CoEConfig, allowed: bool) -> None:
    """Refuse (CommandInputError) a key change that was not asked for; say an allowed one."""
    if not app_is_running(config.serve.app_name):
        return  # nothing runs under this name yet: this apply starts it
    running, problem = call_deployment(config.serve.app_name, INGRESS, "api_key_fingerprint")
    if problem is not None:
        if not allowed:
            raise CommandInputError(
                f"cannot tell whether this apply changes the running API key ({problem}); "
                f"nothing was applied. Pass {CHANGE_FLAG} to apply anyway"
            )
        say(f"the running API key is unknown ({problem}); applying ({CHANGE_FLAG})")
        return
    applied = key_fingerprint(config.serve.resolved_api_key())
    change = api_key_change(running, applied, config.serve.api_key_env)
    if change is None:
        return
    if not allowed:
        raise CommandInputError(f"{change}; nothing was applied. Pass {CHANGE_FLAG} to do it")
    say(f"{change} ({CHANGE_FLAG})")


def _apply(args: argparse.Namespace) -> int:
    from cluster.serve import lifecycle
    from cluster.serve.app import build_app
    from cluster.serve.rollout import RolloutFailed, deploy_and_wait
    from cluster.setup_steps import prepare_checkpoints

    config = load_config(args.config)

    def unavailable(error: Exception) -> ClusterUnavailable:
        return ClusterUnavailable(f"no running cluster at {args.address!r}: {error}")

    with lifecycle.joined(args.address, unavailable=unavailable):
        check_key_change(config, args.change_api_key)
        checkpoints = prepare_checkpoints(config, progress=say)
        say(f"applying {args.config} to application {config.serve.app_name!r}")
        try:
            deploy_and_wait(
                build_app(config, checkpoints),
                config.serve.app_name,
                config.serve.route_prefix,
                args.timeout,
                progress=say,
            )
        except RolloutFailed as error:
            say(f"error: {error}")
            return 1
        say("applied: the router reconfigured in place; unchanged experts kept running")
    return 0


def add_apply_command(commands: Any) -> None:
    apply = commands.add_parser(
        "apply",
        help="apply a changed config to a running cluster (new experts, categories, map, "
        "scores) without restarting what did not change",
    )
    apply.add_argument("config", help="config YAML")
    apply.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    apply.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for the application to run the new config; past it the "
        "apply fails naming the deployments still starting and why (they keep trying; "
        f"unchanged deployments keep serving). Default {DEFAULT_TIMEOUT_S:g}",
    )
    apply.add_argument(
        CHANGE_FLAG,
        action="store_true",
        help="allow the apply to turn authentication off or on, or to change the API key "
        "(the key comes from this shell's environment, serve.api_key_env)",
    )
    apply.set_defaults(run=_apply)
