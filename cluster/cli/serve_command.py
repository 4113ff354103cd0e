"""`coe serve`: start Ray and the CoE application in the foreground, stop cleanly on Ctrl-C."""

from __future__ import annotations

import signal
import socket
import threading
import time
from types import FrameType

from cluster.config import CoEConfig, ServeSettings
from cluster.console import Say
from cluster.serve import lifecycle
from cluster.serve.lifecycle import remove_arena

# Imported from here by callers outside this package (tests/e2e).
__all__ = ["bind_problem", "curl_example", "remove_arena", "serve_foreground", "taken_ports"]


def curl_example(host: str, port: int) -> str:
    body = '{"model":"coe","messages":[{"role":"user","content":"What is the capital of France?"}]}'
    return (
        f"curl -s http://{host}:{port}/v1/chat/completions "
        f"-H 'Content-Type: application/json' -d '{body}'"
    )


def _deployment_states(app_name: str) -> str:
    from ray import serve

    status = serve.status()
    app = status.applications.get(app_name)
    if app is None:
        return "waiting for the application"
    parts = [f"{name}={info.status.value}" for name, info in sorted(app.deployments.items())]
    return f"{app.status.value}: " + ", ".join(parts)


def bind_problem(host: str, port: int) -> str | None:
    """Why binding `host`:`port` fails now, as the proxy's bind would; None if it works.

    SO_REUSEADDR as the HTTP server sets it, so a port left in TIME_WAIT counts as free.
    A host name that does not resolve is left for Serve to report.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror:
            return None
        except OSError as error:
            return error.strerror or str(error)
    return None


def taken_ports(settings: ServeSettings) -> list[str]:
    """One line per configured port that cannot be bound (another server holds it...)."""
    wanted = [("HTTP", settings.port, "--port or serve.port")]
    if settings.grpc_port is not None:
        wanted.append(("gRPC", settings.grpc_port, "serve.grpc_port"))
    lines = []
    for kind, port, option in wanted:
        problem = bind_problem(settings.host, port)
        if problem is not None:
            lines.append(
                f"cannot bind the {kind} port {port} on {settings.host} ({problem}); stop "
                f"what holds it or choose another ({option})"
            )
    return lines


def serve_foreground(config: CoEConfig, say: Say, ready_timeout_s: float = 900.0) -> int:
    """Run until interrupted; return a process exit code (2: nothing could start)."""
    started = time.monotonic()
    # Before any work: otherwise the proxy's bind fails only once the weights are checked
    # and Ray is up, as an OSError in the proxy actor's log.
    taken = taken_ports(config.serve)
    for line in taken:
        say(f"error: {line}")
    if taken:
        return 2
    from cluster.setup_steps import prepare_checkpoints

    checkpoints = prepare_checkpoints(config, progress=say)
    settings = config.serve
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: binding to {settings.host}; the API is reachable from other machines")
    store = settings.object_store_bytes
    sized = "" if store is None else f", object store {store / 1e6:.0f} MB"
    say(f"starting Ray (local, dashboard off{sized})")
    lifecycle.start_local_ray(object_store_memory=store)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        lifecycle.start_serve(settings)
        say(f"deploying {len(config.experts)} experts, the router and the ingress")
        failure: list[BaseException] = []

        def deploy() -> None:
            try:
                lifecycle.deploy(config, checkpoints)
            except BaseException as error:
                failure.append(error)

        deployer = threading.Thread(target=deploy, daemon=True)
        deployer.start()
        last = ""
        while deployer.is_alive() and not stop.is_set():
            deployer.join(timeout=2.0)
            if time.monotonic() - started > ready_timeout_s:
                say(f"not ready after {ready_timeout_s:.0f}s; giving up")
                return 1
            state = _deployment_states(settings.app_name)
            if state != last:
                say(f"{time.monotonic() - started:5.1f}s {state}")
                last = state
        if stop.is_set():
            say("interrupted while starting")
            return 130
        if failure:
            say(f"deployment failed: {failure[0]}")
            return 1
        url = f"http://{settings.host}:{settings.port}"
        say(f"ready in {time.monotonic() - started:.1f}s at {url} (Ctrl-C to stop)")
        say(f"try:\n  {curl_example(settings.host, settings.port)}")
        if settings.grpc_port is not None:
            from cluster.serve.grpc_proxy import check_bind

            say(f"gRPC (coe.v1.CoE, grpc.health.v1.Health) on {settings.host}:{settings.grpc_port}")
            client = "python -m cluster.ingress.grpc.client"
            say(f"  {client} --port {settings.grpc_port} 'What is 2+2?'")
            problem = check_bind(settings)
            if problem is not None:
                say(f"warning: {problem}")
        while not stop.wait(1.0):
            pass
        say("shutting down")
        return 0
    finally:
        # Our handler stays installed until Ray is down, so a second Ctrl-C cannot
        # interrupt the shutdown half-way and leave replicas behind.
        try:
            lifecycle.shutdown(config)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            say("stopped")
