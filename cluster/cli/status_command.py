"""`coe status`: experts, replicas, residency, queue depth and errors of a running cluster.

A short-lived driver joins the running Ray instance (`ray.init(address="auto")`,
as `coe serve` and `make serve` start a local one), asks Serve's controller for
its deployments and the cluster's own deployments for their state, and leaves.
`gather_status` collects one JSON-ready dict; `format_status_table` is a pure
function of it, so the table is tested without a cluster.

Ray's token authentication: a local instance started by `ray.init()` turns it on
and keeps its token in ~/.ray/auth_token; `address="auto"` picks that token up, so
the same user connects without setting anything. With an explicit `--address`,
Ray sends a token only when RAY_AUTH_MODE=token is set (and RAY_AUTH_TOKEN or the
token file holds it); a refused token is reported as such.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cluster.cli.tier_commands import GIB, ClusterUnavailable
from cluster.serve import lifecycle

if TYPE_CHECKING:
    from ray.exceptions import AuthenticationError

EXPERT_PREFIX = "expert-"
EXECUTORS = "executors"
CALL_TIMEOUT_S = 30.0
AUTH_HINT = (
    "the cluster uses Ray token authentication and refused this driver's token; run "
    "`coe status` as the user that started it, or set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) "
    "to the cluster's token, and RAY_AUTH_MODE=token when passing --address"
)


# -- gathering (needs a running cluster) ------------------------------------------


def _refused(error: AuthenticationError) -> ClusterUnavailable:
    return ClusterUnavailable(f"{AUTH_HINT} ({error.message})")


def _unavailable(address: str) -> lifecycle.ErrorTranslator:
    def unavailable(error: Exception) -> ClusterUnavailable:
        return ClusterUnavailable(
            f"no running cluster at {address!r} ({error}); start one with `coe serve` "
            "or `make serve` in another terminal"
        )

    return unavailable


def _serve_details() -> dict[str, Any]:
    from ray.serve.exceptions import RayServeException

    from cluster.serve.ray_internals import serve_details

    try:
        return serve_details()
    except RayServeException as error:
        raise ClusterUnavailable(f"Ray runs but Serve does not ({error})") from None


def call_deployment(app: str, deployment: str, method: str) -> tuple[Any, str | None]:
    """One deployment method's answer, or why there is none (never raises)."""
    from ray import serve

    try:
        handle = serve.get_deployment_handle(deployment, app_name=app)
        return getattr(handle, method).remote().result(timeout_s=CALL_TIMEOUT_S), None
    except Exception as error:  # a status report shows what it could not learn
        return None, f"{deployment}.{method}() failed: {type(error).__name__}: {error}"


def _text(value: Any) -> str:
    """A status as its name, whether Serve sent the enum or its JSON string."""
    return str(getattr(value, "value", value))


def _deployment_rows(app_details: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {}
    for name, deployment in sorted(app_details.get("deployments", {}).items()):
        replicas = deployment.get("replicas", [])
        rows[name] = {
            "status": _text(deployment.get("status", "UNKNOWN")),
            "running": sum(1 for r in replicas if r.get("state") == "RUNNING"),
            "target": int(deployment.get("target_num_replicas", 0)),
            "message": str(deployment.get("message", "")),
        }
    return rows


def gather_status(address: str, app: str) -> dict[str, Any]:
    """Everything `coe status` prints, as one JSON-ready dict."""
    with lifecycle.joined(address, unavailable=_unavailable(address), refused=_refused):
        applications = _serve_details().get("applications", {})
        if app not in applications:
            raise ClusterUnavailable(
                f"no Serve application {app!r} in the running cluster; applications: "
                f"{sorted(applications) or 'none'}"
            )
        app_details = applications[app]
        deployments = _deployment_rows(app_details)
        problems: list[str] = []
        gathered: dict[str, Any] = {
            "app": app,
            "app_status": _text(app_details.get("status", "UNKNOWN")),
            "deployments": deployments,
        }
        for key, deployment, method in (
            ("router", "router", "info"),
            ("stats", "ingress", "stats"),
            ("residency", "placement", "residency"),
            ("tier_metrics", "placement", "metrics"),
            ("executors", EXECUTORS, "info"),
        ):
            if deployment not in deployments:
                gathered[key] = None
                continue
            gathered[key], problem = call_deployment(app, deployment, method)
            if problem is not None:
                problems.append(problem)
        gathered["problems"] = problems
        return gathered


# -- rendering (pure) -------------------------------------------------------------


def expert_rows(gathered: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per expert deployment, joined with residency and the ingress's counts."""
    stats = gathered.get("stats") or {}
    residents: dict[str, dict[str, Any]] = {}
    for device, state in sorted((gathered.get("residency") or {}).items()):
        for resident in state.get("residents", []):
            residents[resident["expert"]] = {**resident, "device": device}
    deployments = gathered.get("deployments", {})
    # Each expert and the deployment that serves it: its own, or the executor pool.
    served_by = {
        name[len(EXPERT_PREFIX) :]: (deployment, "")
        for name, deployment in deployments.items()
        if name.startswith(EXPERT_PREFIX)
    }
    pool = deployments.get(EXECUTORS)
    if pool is not None:
        for expert in (gathered.get("executors") or {}).get("experts", []):
            served_by[expert] = (pool, "pool ")
    rows = []
    for expert, (deployment, kind) in sorted(served_by.items()):
        by_status = stats.get("requests", {}).get(expert, {})
        rows.append(
            {
                "expert": expert,
                "status": deployment["status"],
                "replicas": f"{kind}{deployment['running']}/{deployment['target']}",
                "resident": residents.get(expert),
                "queue": int(stats.get("in_flight", {}).get(expert, 0)),
                "requests": sum(int(n) for n in by_status.values()),
                "errors": int(stats.get("errors", {}).get(expert, 0)),
            }
        )
    return rows


def _residency_cell(resident: Mapping[str, Any] | None) -> str:
    if resident is None:
        return "-"
    flags = "pinned" if resident.get("pinned") else ("in use" if resident.get("in_use") else "")
    cell = f"{resident['device']} {resident['nbytes'] / 2**20:.0f} MiB"
    return f"{cell} {flags}".rstrip()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (header, *rows)
    ]


def format_status_table(gathered: Mapping[str, Any]) -> str:
    """The text `coe status` prints for what `gather_status` returned."""
    router = gathered.get("router") or {}
    lines = [
        f"application {gathered['app']!r}: {gathered['app_status']}; "
        f"router mode {router.get('mode', 'unknown')}"
    ]
    rows = expert_rows(gathered)
    has_stats = gathered.get("stats") is not None
    cells = [
        [
            row["expert"],
            row["status"],
            row["replicas"],
            _residency_cell(row["resident"]),
            str(row["queue"]) if has_stats else "?",
            str(row["requests"]) if has_stats else "?",
            str(row["errors"]) if has_stats else "?",
        ]
        for row in rows
    ]
    header = ["expert", "status", "replicas", "resident", "queue", "requests", "errors"]
    lines += _table(header, cells) if rows else ["no expert deployments"]
    others = [
        f"{name} {d['status']} {d['running']}/{d['target']}"
        for name, d in sorted(gathered.get("deployments", {}).items())
        if not name.startswith(EXPERT_PREFIX)
    ]
    if others:
        lines.append("other deployments: " + ", ".join(others))
    lines += _device_lines(gathered.get("residency"), gathered.get("tier_metrics"))
    stats = gathered.get("stats")
    if stats is not None:
        failed_early = int(stats.get("errors", {}).get("none", 0))
        lines.append(
            f"ingress: {stats.get('total', 0)} requests, {stats.get('fallbacks', 0)} fallbacks, "
            f"{failed_early} rejected before routing; routed "
            + (", ".join(f"{c} {n}" for c, n in sorted(stats.get("routed", {}).items())) or "-")
        )
    for deployment in gathered.get("deployments", {}).values():
        if deployment["status"] != "HEALTHY" and deployment.get("message"):
            lines.append(f"note: {deployment['message']}")
    lines += [f"unavailable: {problem}" for problem in gathered.get("problems", [])]
    return "\n".join(lines)


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def _device_lines(residency: Any, tier_metrics: Any) -> list[str]:
    if not residency:
        return ["tiers: off (no placement service)"]
    devices = (tier_metrics or {}).get("devices", {})
    lines = []
    for device, state in sorted(residency.items()):
        counters = devices.get(device, {})
        lines.append(
            f"{device}: {len(state.get('residents', []))} resident, "
            f"{_size(state['used_bytes'])} of {_size(state['budget_bytes'])} used "
            f"({state.get('policy', '?')}); hits {counters.get('hits', 0):.0f}, "
            f"switches {counters.get('switches', 0):.0f}, "
            f"evictions {counters.get('evictions', 0):.0f}"
        )
    return lines


# -- the command ------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    gathered = gather_status(args.address, args.app)
    if args.json:
        print(json.dumps(gathered, indent=2, sort_keys=True))
    else:
        print(format_status_table(gathered))
    return 0


def add_status_command(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="experts, replicas, residency, queue depth and errors of a running cluster",
    )
    status.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    status.add_argument("--app", default="coe", help="Serve application name (default: coe)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(run=_status)
