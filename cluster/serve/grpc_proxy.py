"""What Ray Serve's gRPC proxy needs from the project: servicers, options, the bind address.

This module runs inside Serve's controller and proxy processes, so it imports
nothing heavy (no router, no torch).

Binding. Serve 2.60's proxy binds its gRPC server to `[::]:port` (every
interface): `grpc_util.start_grpc_server` calls `default_impl.add_grpc_address`
with that literal address, and imports the servicer functions only *after* the
bind, so a servicer module cannot change it. What does run earlier is Ray's
worker-process setup hook: Serve accepts `controller_options.runtime_env.env_vars`
for its controller, the proxy actors inherit the controller's runtime env, and a
worker runs the hook named by that env before it creates its actor. The hook
below wraps `add_grpc_address` so the proxy binds to the HTTP host instead (a
loopback address by default). `start_grpc_server` looks the function up at call
time, so the wrapper is what it calls. `check_bind` verifies the result from
the outside, since all of this rests on Serve internals (each one is in
cluster/serve/ray_internals.py).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from cluster.serve.ray_internals import (
    WORKER_SETUP_HOOK_ENV,
    GrpcBind,
    serve_grpc_bind,
    set_serve_grpc_bind,
)

if TYPE_CHECKING:
    from cluster.config import ServeSettings

logger = logging.getLogger("ray.serve")

SERVICER_FUNCTIONS = [
    "cluster.serve.grpc_proxy.add_coe_servicer",
    "cluster.serve.grpc_proxy.add_health_servicer",
]
# Read by `bind_grpc_to_host` in Serve's controller and proxy processes.
GRPC_HOST_ENV = "COE_GRPC_HOST"
# Ray's (reserved) variable naming a worker's setup hook; `ray.init(runtime_env=
# {"worker_process_setup_hook": ...})` sets the same variable for a whole job.
RAY_SETUP_HOOK_ENV = WORKER_SETUP_HOOK_ENV
SETUP_HOOK = "cluster.serve.grpc_proxy.bind_grpc_to_host"
ALL_INTERFACES = frozenset({"0.0.0.0", "::", ""})
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def add_coe_servicer(servicer: Any, server: Any) -> None:
    """Serve calls this in its proxy; the generated package is built if it is missing."""
    from cluster.ingress.grpc.codegen import ensure_generated

    ensure_generated()
    from cluster.ingress.grpc.generated import coe_pb2_grpc

    coe_pb2_grpc.add_CoEServicer_to_server(servicer, server)


def add_health_servicer(servicer: Any, server: Any) -> None:
    """The standard `grpc.health.v1.Health`; Serve routes `Check` to the ingress's method."""
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_grpc_to_host() -> None:
    """Worker setup hook: make Serve's gRPC proxy bind to $COE_GRPC_HOST, not `[::]`.

    Runs in every process started with the controller's runtime env; it only
    replaces a function, and never raises (a failing hook would kill the worker).
    """
    host = os.environ.get(GRPC_HOST_ENV, "").strip()
    if host in ALL_INTERFACES:
        return
    try:
        original: GrpcBind = serve_grpc_bind()
    except Exception as error:  # keep the worker alive; check_bind reports the outcome
        logger.warning("gRPC bind hook could not load Serve: %s", error)
        return
    if getattr(original, "coe_bind_host", None) == host:
        return

    def add_grpc_address(grpc_server: Any, server_address: str) -> Any:
        port = server_address.rsplit(":", 1)[-1]
        if server_address.startswith("[::]:") and port.isdigit():
            server_address = grpc_address(host, int(port))
        return original(grpc_server, server_address)

    add_grpc_address.coe_bind_host = host  # type: ignore[attr-defined]
    set_serve_grpc_bind(add_grpc_address)


def grpc_options(settings: ServeSettings) -> dict[str, Any] | None:
    """`serve.start(grpc_options=...)`, or None when gRPC is off."""
    if settings.grpc_port is None:
        return None
    return {
        "port": settings.grpc_port,
        "grpc_servicer_functions": list(SERVICER_FUNCTIONS),
        "request_timeout_s": settings.request_timeout_s,
    }


def controller_options(settings: ServeSettings) -> dict[str, Any] | None:
    """`serve.start(controller_options=...)` carrying the bind hook, or None when not needed."""
    if settings.grpc_port is None or settings.host.strip() in ALL_INTERFACES:
        return None
    env = {RAY_SETUP_HOOK_ENV: SETUP_HOOK, GRPC_HOST_ENV: settings.host}
    return {"runtime_env": {"env_vars": env}}


def serve_start_options(settings: ServeSettings) -> dict[str, Any]:
    """The gRPC part of `serve.start`'s keyword arguments (empty when gRPC is off)."""
    options: dict[str, Any] = {}
    grpc = grpc_options(settings)
    if grpc is not None:
        options["grpc_options"] = grpc
    controller = controller_options(settings)
    if controller is not None:
        options["controller_options"] = controller
    return options


def listening_addresses(port: int) -> set[str]:
    """The local addresses something listens on at `port` (TCP)."""
    import psutil

    return {
        connection.laddr.ip
        for connection in psutil.net_connections(kind="tcp")
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
    }


def check_bind(settings: ServeSettings) -> str | None:
    """A warning when the gRPC port listens somewhere the settings did not ask for."""
    if settings.grpc_port is None:
        return None
    addresses = listening_addresses(settings.grpc_port)
    if not addresses:
        return f"nothing listens on gRPC port {settings.grpc_port}"
    wanted = settings.host.strip()
    if wanted in ALL_INTERFACES:
        return None
    allowed = {wanted, "::ffff:" + wanted} | (LOOPBACK if wanted in LOOPBACK else set())
    stray = sorted(addresses - allowed)
    if stray:
        return (
            f"the gRPC port {settings.grpc_port} listens on {', '.join(stray)}, "
            f"not only on {wanted}: it may be reachable from other machines"
        )
    return None
