"""Starting, joining and stopping Ray + Serve: how every driver of the project does it.

- A local instance (`coe serve`, the benchmarks, the integration tests): `local_serve`,
  or its steps `start_local_ray`, `start_serve` and `shutdown` for a caller that must
  act between them (`coe serve` installs its signal handlers once Ray is up).
- Ray alone (the object store of benchmarks/switch.py): `local_ray`.
- A running instance (`coe apply`, `coe status`, `coe tiers`): `joined`, a short-lived
  driver that stays quiet and leaves on exit.
- The application: `deploy` / `run_app`, and `undeploy` to remove it again.

Stopping gives back the device arena too: it lives in shared memory, not in any Ray
process, so nothing else frees it. Importing this module imports neither Ray nor the
deployments; each function imports what it uses.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from ray.exceptions import AuthenticationError
    from ray.serve import Application

    from cluster.config import CoEConfig, ServeSettings

# Turns the error `ray.init` raised into the caller's own (what its user should be told).
ErrorTranslator = Callable[[Exception], Exception]

# A driver that joins a running instance only asks it something: Ray's INFO lines and
# the workers' logs (log_to_driver) would bury the command's own output.
JOIN_OPTIONS: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
# Serve's driver-side logger; at INFO it repeats what the progress lines say.
SERVE_LOGGER = "ray.serve"
# How long a stopped cluster's processes may take to exit and let go of the arena.
ARENA_SETTLE_S = 3.0


def local_ray_options(
    *,
    logging_level: int | None = logging.WARNING,
    log_to_driver: bool | None = None,
    object_store_memory: int | None = None,
) -> dict[str, Any]:
    """`ray.init` keywords for a fresh local instance with the dashboard off.

    None leaves an option to Ray (its logging level then follows RAY_LOGGER_LEVEL).
    """
    options: dict[str, Any] = {"address": "local", "include_dashboard": False}
    chosen = {
        "logging_level": logging_level,
        "log_to_driver": log_to_driver,
        "object_store_memory": object_store_memory,
    }
    options.update({name: value for name, value in chosen.items() if value is not None})
    return options


def serve_options(settings: ServeSettings) -> dict[str, Any]:
    """`serve.start` keywords: HTTP on the configured host and port, gRPC when configured."""
    from cluster.serve.grpc_proxy import serve_start_options

    return {
        "http_options": {"host": settings.host, "port": settings.port},
        **serve_start_options(settings),
    }


def base_url(settings: ServeSettings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def start_local_ray(*, quiet_serve_logs: bool = True, **options: Any) -> None:
    """Start a fresh local Ray instance (`local_ray_options` takes `options`)."""
    import ray

    if quiet_serve_logs:
        logging.getLogger(SERVE_LOGGER).setLevel(logging.WARNING)
    ray.init(**local_ray_options(**options))


def start_serve(settings: ServeSettings) -> None:
    """Start Serve's controller and proxies on the Ray instance this driver runs."""
    from ray import serve

    serve.start(**serve_options(settings))


def shutdown(config: CoEConfig | None = None) -> None:
    """Stop Serve, then Ray, then give back `config`'s arena; each step runs if one fails."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        try:
            ray.shutdown()
        finally:
            if config is not None:
                remove_arena(config)


@contextmanager
def local_ray(**options: Any) -> Iterator[None]:
    """A fresh local Ray instance without Serve (`local_ray_options` takes `options`)."""
    import ray

    start_local_ray(quiet_serve_logs=False, **options)
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def local_serve(
    settings: ServeSettings, *, quiet_serve_logs: bool = True, config: CoEConfig | None = None
) -> Iterator[str]:
    """A fresh local Ray + Serve listening as `settings` say; yields the HTTP base URL.

    On exit Serve and Ray stop, and `config`'s arena (when given) is removed. The object
    store is `settings.object_store_bytes` large (None: Ray's default).
    """
    start_local_ray(
        quiet_serve_logs=quiet_serve_logs, object_store_memory=settings.object_store_bytes
    )
    try:
        start_serve(settings)
        yield base_url(settings)
    finally:
        shutdown(config)


@contextmanager
def joined(
    address: str,
    *,
    unavailable: ErrorTranslator,
    refused: Callable[[AuthenticationError], Exception] | None = None,
) -> Iterator[None]:
    """This process as a quiet driver of the running instance at `address`, until exit.

    When nothing runs there (`ray.init` raises ConnectionError or RuntimeError), raises
    what `unavailable` makes of that error. When the instance refuses this driver's
    token (AuthenticationError), raises what `refused` makes of it, or the error itself.
    """
    import ray
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, **JOIN_OPTIONS)
    except AuthenticationError as error:
        if refused is None:
            raise
        raise refused(error) from None
    except (ConnectionError, RuntimeError) as error:
        raise unavailable(error) from None
    try:
        yield
    finally:
        ray.shutdown()


def run_app(application: Application, name: str, route_prefix: str = "/") -> None:
    """Deploy `application` as `name` and wait until it runs (Serve updates it in place)."""
    from ray import serve

    serve.run(application, name=name, route_prefix=route_prefix)


def deploy(config: CoEConfig, checkpoints: dict[str, Path]) -> None:
    """The CoE application of `config`, deployed under its configured name and prefix."""
    from cluster.serve.app import build_app

    run_app(build_app(config, checkpoints), config.serve.app_name, config.serve.route_prefix)


def undeploy(app_name: str, config: CoEConfig | None = None) -> None:
    """Delete the application `app_name`, then give back `config`'s arena when given."""
    from ray import serve

    serve.delete(app_name)
    if config is not None:
        remove_arena(config)


def remove_arena(config: CoEConfig, settle_s: float = ARENA_SETTLE_S) -> list[Path]:
    """The device arena lives in shared memory: give it back when the cluster stops.

    Removes the application's arena files no process maps any more, waiting up to
    `settle_s` for the stopping cluster's processes to exit; an arena another running
    cluster maps is left alone. Returns the files removed.
    """
    if not config.tiers.enabled:
        return []
    import time
    from pathlib import Path

    from cluster.serve.placement_replica import arena_files
    from memory_tiers.arena_files import remove_stale

    directory = Path(config.tiers.arena_dir)
    names = arena_files(config)
    deadline = time.monotonic() + settle_s
    removed = remove_stale(directory, names)
    while _names_any(directory, names) and time.monotonic() < deadline:
        time.sleep(0.2)
        removed += remove_stale(directory, names)
    return removed


def _names_any(directory: Path, names: re.Pattern[str]) -> bool:
    try:
        return any(names.fullmatch(name) for name in os.listdir(directory))
    except OSError:
        return False
