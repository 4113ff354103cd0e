"""Every private Ray and Ray Serve API the project uses, each with what it relies on and why.

Ray keeps no compatibility promise for underscore names, `ray._private`,
`ray._common` or `ray.serve._private`; they change between releases without notice.
That is why pyproject.toml pins `ray[serve]==2.60.0`: before moving the pin, read
each item below against the new Ray's source (and run
tests/unit/cluster/serve/test_ray_internals.py, which checks what it can without a
cluster). Callers import from here, never from those modules, so this file is the
whole list.

This module imports Ray only inside its functions: Serve's controller and proxy
processes import it through cluster/serve/grpc_proxy.py, which must stay light.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve import Application, Deployment

# Serve's function that adds a listening address to its gRPC proxy's server.
GrpcBind = Callable[[Any, str], Any]

# Relies on: Ray's reserved variable (`ray._private.ray_constants.
# WORKER_PROCESS_SETUP_HOOK_ENV_VAR`) that names the function a worker process runs
# before it creates its actor. Needed because Serve accepts env vars for its controller
# (inherited by its proxies) but no setup hook, and only a hook runs early enough to
# change how the gRPC proxy binds (see cluster/serve/grpc_proxy.py). Spelled out, not
# imported, so that reading it imports nothing.
WORKER_SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


def with_version(deployment: Deployment, version: str) -> Deployment:
    """`deployment` with a fixed version, so Serve restarts its replicas only when it changes.

    Relies on: `Deployment.options(version=..., _internal=True)`. Serve 2.60 refuses
    `version` from users ("Serve manages deployment versions internally") but still
    reads it when deploying; `_internal=True` is how Serve's own callers set it.
    Needed because `serve.run` otherwise gives every deployment a fresh version and
    restarts every replica on any config change (see cluster/serve/app.py).
    """
    return deployment.options(version=version, _internal=True)


def serve_grpc_bind() -> GrpcBind:
    """The function Serve's gRPC proxy calls to bind its server.

    Relies on: `ray.serve._private.default_impl.add_grpc_address`, which
    `grpc_util.start_grpc_server` looks up at call time and calls with `[::]:port`.
    Needed to bind the gRPC proxy to the configured host instead of every interface.
    """
    from ray.serve._private import default_impl

    bind: GrpcBind = default_impl.add_grpc_address
    return bind


def set_serve_grpc_bind(bind: GrpcBind) -> None:
    """Make Serve's gRPC proxy bind through `bind` (in this process)."""
    from ray.serve._private import default_impl

    # Serve types the server as its own gRPCGenericServer; `bind` takes any server.
    default_impl.add_grpc_address = bind  # type: ignore[assignment]


def resolve_import_path(path: str) -> Any:
    """What a dotted `module.attribute` path names, resolved as Ray resolves it.

    Relies on: `ray._common.utils.import_attr`, which Serve uses for
    `grpc_servicer_functions` and Ray for the worker setup hook. Needed to check that
    the paths the project hands to Serve resolve, the way Serve will resolve them.
    """
    from ray._common.utils import import_attr

    return import_attr(path)


def serve_details() -> dict[str, Any]:
    """Serve's full state (applications, deployments, replicas), as the dashboard shows it.

    Relies on: `ray.serve.context._get_global_client()` and the client's
    `get_serve_details()`. Needed because the public `serve.status()` leaves out what
    `coe status` prints: each deployment's target replica count and each replica's state.
    Raises `RayServeException` when no Serve controller runs.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None  # raise_if_no_controller_running is the default
    details: dict[str, Any] = client.get_serve_details()
    return details


def running_replicas(deployment_status: Any) -> int:
    """How many of a deployment's replicas run, from a `serve.status()` deployment entry.

    Relies on: `ray.serve._private.common.ReplicaState`, the key type of the public
    `DeploymentStatusOverview.replica_states`, which Serve does not export itself.
    """
    from ray.serve._private.common import ReplicaState

    return int(deployment_status.replica_states.get(ReplicaState.RUNNING, 0))


def object_store_bytes_used(gcs_address: str, timeout_s: float) -> int:
    """Bytes in use in the Ray object store of the instance at `gcs_address`.

    Relies on: `ray._private.internal_api.get_state_from_address` and
    `get_memory_info_reply`, what `ray memory --stats-only` calls. Needed because no
    public API reports the object store's use without starting a driver.
    """
    from ray._private import internal_api

    reply = internal_api.get_memory_info_reply(
        internal_api.get_state_from_address(gcs_address), timeout_seconds=timeout_s
    )
    return int(reply.store_stats.object_store_bytes_used)


def bound_deployment(application: Application) -> Deployment:
    """The deployment an `Application` binds, with its arguments (other applications).

    Relies on: `Application._bound_deployment`, how Serve's own `build_app` walks a
    graph. Needed to check the graph `cluster.serve.app.build_app` binds without Ray.
    """
    deployment: Deployment = application._bound_deployment
    return deployment


def deployment_config(deployment: Deployment) -> Any:
    """A deployment's full `DeploymentConfig` (autoscaling, retry bound, user config...).

    Relies on: `Deployment._deployment_config`. Needed for the options the public
    `Deployment` properties leave out (`autoscaling_config`,
    `max_constructor_retry_count`).
    """
    return deployment._deployment_config


def run_without_waiting(application: Application, name: str, route_prefix: str | None) -> None:
    """Hand `application` to Serve as `name` and return at once, not when it runs.

    Relies on: `ray.serve.api._run(..., _blocking=False)`, what the public `serve.run`
    calls with `_blocking=True`. Needed because `serve.run` waits without a bound for the
    application to run: a replica that can never be placed (a resource no node has)
    would hold `coe apply` forever. The caller waits itself, with a deadline.
    """
    from ray.serve.api import _run

    _run(application, _blocking=False, name=name, route_prefix=route_prefix)


def in_local_object_store(ref: Any) -> bool:
    """Whether the object is in this node's shared-memory object store now (not only
    spilled to disk).

    Relies on: `CoreWorker.object_exists(ref)`, the worker's own check against the local
    plasma store (no fetch, no restore). Needed because the owner's location table keeps
    listing the node of a spilled primary copy, so `get_local_object_locations` cannot
    tell a spilled object from one in memory on a single node.
    """
    from ray._private.worker import global_worker

    worker: Any = global_worker  # its core_worker is set once Ray is up (untyped)
    core_worker = worker.core_worker
    return bool(core_worker.object_exists(ref))
