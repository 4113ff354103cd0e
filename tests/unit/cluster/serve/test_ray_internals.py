"""The private Ray pieces `cluster.serve.ray_internals` wraps are still there and still behave.

These run without a cluster; they are the first thing to run after moving Ray's pin.
The two that need a running instance (`serve_details`, `object_store_bytes_used`) are
only checked for the names they call; tests/integration exercises them for real.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import ray
from ray import serve

from cluster.serve import grpc_proxy, ray_internals


@serve.deployment
class Echo:
    def __call__(self, text: str) -> str:
        return text


def test_pinned_ray_is_the_one_these_internals_were_read_against() -> None:
    assert ray.__version__ == "2.60.0"


def test_the_setup_hook_variable_is_rays() -> None:
    from ray._private import ray_constants

    assert ray_internals.WORKER_SETUP_HOOK_ENV == ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR


def test_with_version_sets_the_version_serve_deploys_with() -> None:
    versioned = ray_internals.with_version(Echo, "v1")
    assert versioned.version == "v1"
    assert Echo.version != "v1"  # a copy: the original deployment is unchanged


def test_the_grpc_bind_function_can_be_read_and_replaced() -> None:
    serves_bind = ray_internals.serve_grpc_bind()
    assert callable(serves_bind)

    def replacement(server: Any, address: str) -> None: ...

    ray_internals.set_serve_grpc_bind(replacement)
    try:
        assert ray_internals.serve_grpc_bind() is replacement
    finally:
        ray_internals.set_serve_grpc_bind(serves_bind)
    assert ray_internals.serve_grpc_bind() is serves_bind


def test_import_paths_resolve_as_ray_resolves_them() -> None:
    hook = ray_internals.resolve_import_path(grpc_proxy.SETUP_HOOK)
    assert hook is grpc_proxy.bind_grpc_to_host


def test_running_replicas_counts_the_running_state_only() -> None:
    from ray.serve.schema import ReplicaState

    status = SimpleNamespace(replica_states={ReplicaState.RUNNING: 2, ReplicaState.STARTING: 1})
    assert ray_internals.running_replicas(status) == 2
    assert ray_internals.running_replicas(SimpleNamespace(replica_states={})) == 0


def test_a_bound_application_shows_its_deployment_and_config() -> None:
    deployment = Echo.options(name="echo", max_ongoing_requests=3)
    bound = ray_internals.bound_deployment(deployment.bind())
    assert bound.name == "echo"
    assert ray_internals.deployment_config(bound).max_ongoing_requests == 3


def test_what_needs_a_cluster_still_names_existing_functions() -> None:
    from ray._private import internal_api
    from ray.serve import context
    from ray.serve._private.client import ServeControllerClient

    assert callable(internal_api.get_state_from_address)
    assert callable(internal_api.get_memory_info_reply)
    assert callable(context._get_global_client)
    assert callable(ServeControllerClient.get_serve_details)


def test_serves_non_blocking_run_still_takes_its_blocking_flag() -> None:
    import inspect

    from ray.serve.api import _run

    parameters = inspect.signature(_run).parameters
    assert {"_blocking", "name", "route_prefix"} <= set(parameters)
