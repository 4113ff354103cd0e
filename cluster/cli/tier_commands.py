"""`coe tiers`: residency per device of a running cluster, and the tier simulator."""

from __future__ import annotations

import argparse
import json
from typing import Any

from benchmarks.tier_sim.__main__ import main as simulator_main
from cluster.serve import lifecycle
from memory_tiers.tier_stats import DeviceResidency, ResidentInfo, format_residency

GIB = 1024**3


class ClusterUnavailable(RuntimeError):
    """No running cluster, or no placement service in the named application."""


def _spilled(counters: dict[str, Any]) -> str:
    """Switches that first restored the expert from disk (the object store spilled it)."""
    restored = counters.get("spilled_switches", 0.0)
    if not restored:
        return ""
    return f"; {restored:.0f} restored from disk in {counters.get('restore_seconds', 0.0):.3f} s"


def format_status(residency: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Residency per device (as the placement service sends it), then its counters."""
    devices = {
        name: DeviceResidency(
            device=state["device"],
            budget_bytes=state["budget_bytes"],
            used_bytes=state["used_bytes"],
            policy=state["policy"],
            residents=tuple(
                ResidentInfo(**resident)
                for resident in sorted(state["residents"], key=lambda r: r["offset"])
            ),
        )
        for name, state in residency.items()
    }
    lines = [format_residency(devices)]
    for device, counters in sorted(metrics.get("devices", {}).items()):
        lines.append(
            f"{device}: hits {counters['hits']:.0f}, misses {counters['misses']:.0f}, "
            f"switches {counters['switches']:.0f}, evictions {counters['evictions']:.0f}, "
            f"moved {counters['bytes_moved'] / GIB:.3f} GiB in {counters['switch_seconds']:.3f} s"
            + _spilled(counters)
        )
    slots = metrics.get("slots")
    if slots:
        lines.append(
            f"active slots: {slots['active']:.0f} of {slots['slots']:.0f} busy, "
            f"{slots['waits']:.0f} waits, longest {slots['wait_seconds_max']:.3f} s"
        )
    return "\n".join(lines)


def fetch_residency(address: str, app_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ask a running cluster's placement service for its residency and metrics."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    def unavailable(error: Exception) -> ClusterUnavailable:
        return ClusterUnavailable(
            f"no running cluster at {address!r} ({error}); start one with `make serve`"
        )

    with lifecycle.joined(address, unavailable=unavailable):
        try:
            handle = serve.get_deployment_handle("placement", app_name=app_name)
            residency = handle.residency.remote().result(timeout_s=30)
            metrics = handle.metrics.remote().result(timeout_s=30)
        except RayServeException as error:
            raise ClusterUnavailable(
                f"application {app_name!r} has no placement service ({type(error).__name__}); "
                "is tiers.enabled set in its config?"
            ) from None
    return residency, metrics


def _status(args: argparse.Namespace) -> int:
    residency, metrics = fetch_residency(args.address, args.app)
    if args.json:
        print(json.dumps({"residency": residency, "metrics": metrics}, indent=2))
    else:
        print(format_status(residency, metrics))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    forwarded = list(args.simulator_args)
    if forwarded[:1] == ["--"]:
        forwarded = forwarded[1:]
    return simulator_main(forwarded)


def add_tier_commands(commands: Any) -> None:
    tiers = commands.add_parser(
        "tiers", help="residency per device of a running cluster; the tier simulator"
    )
    tiers.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    tiers.add_argument("--app", default="coe", help="Serve application name (default: coe)")
    tiers.add_argument("--json", action="store_true", help="print JSON instead of a table")
    tiers.set_defaults(run=_status)
    tier_commands = tiers.add_subparsers(dest="tiers_command")
    simulate = tier_commands.add_parser(
        "simulate",
        help="replay a trace against SN40L / DGX / this-machine tier profiles "
        "(arguments go to `python -m benchmarks.tier_sim`; try `simulate -- paper`)",
    )
    simulate.add_argument("simulator_args", nargs=argparse.REMAINDER)
    simulate.set_defaults(run=_simulate)
