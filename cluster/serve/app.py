"""Builds the Serve application from a config: one deployment per expert, a router, an ingress.

`app_builder` is the import path `serve run` and `serve deploy` use
(`cluster.serve.app:app_builder`, with `args: {config: ...}`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray.serve import Application, Deployment
from ray.serve.config import RequestRouterConfig

from cluster.config import AutoscalingSettings, CoEConfig, ConfigError, ExpertSettings, load_config
from cluster.console import COE_PREFIX, sayer
from cluster.ingress.auth import key_fingerprint
from cluster.serve.autoscaling import PolicySettings, serve_autoscaling_config
from cluster.serve.deployments import (
    ExecutorDeployment,
    ExpertDeployment,
    IngressDeployment,
    PlacementDeployment,
    RouterDeployment,
)
from cluster.serve.placement_replica import SEE_EVERY_GPU
from cluster.serve.ray_internals import with_version
from cluster.serve.residency_router import ROUTER_PATH, STATS_PERIOD_S
from cluster.setup_steps import prepare_checkpoints

INGRESS_NAME = "ingress"
ROUTER_NAME = "router"
PLACEMENT_NAME = "placement"
EXECUTOR_NAME = "executors"
INGRESS_MAX_ONGOING = 1000


def expert_deployment_name(expert: str) -> str:
    return f"expert-{expert}"


# The code every replica runs; a change to it must restart replicas even when their
# arguments are the same. (The placement logic lives in memory_tiers/grant_service.py.)
CODE_FILES = (
    "cluster/serve/deployments.py",
    "cluster/serve/expert_replica.py",
    "cluster/serve/executor_replica.py",
    "cluster/serve/placement_client.py",
    "actors/executor.py",
    "actors/weights/tiered_weights.py",
    "cluster/serve/router_replica.py",
    "cluster/serve/ingress_replica.py",
    "cluster/serve/handle_backend.py",
    "cluster/serve/placement_replica.py",
    "cluster/serve/metrics.py",
    "cluster/ingress/service.py",
    "cluster/ingress/http_api.py",
    "cluster/ingress/grpc/methods.py",
    "memory_tiers/grant_service.py",
)
_PROJECT_DIR = Path(__file__).resolve().parents[2]
_CODE_VERSION = hashlib.sha256(
    b"".join((_PROJECT_DIR / name).read_bytes() for name in CODE_FILES)
).hexdigest()[:16]


def autoscaling_config(settings: AutoscalingSettings) -> dict[str, Any]:
    """The `autoscaling_config` Serve gets for an expert: Serve's own policy's fields, or
    the expert autoscaling policy (`cluster/serve/autoscaling.py`) with its settings."""
    if settings.policy == "default":
        return settings.model_dump(exclude_none=True, exclude={"policy", "idle", "idle_s"})
    policy = PolicySettings(
        idle_mode=settings.idle,
        idle_s=settings.idle_s,
        upscale_delay_s=settings.upscale_delay_s,
        downscale_delay_s=settings.downscale_delay_s,
    )
    return serve_autoscaling_config(
        policy,
        max_replicas=settings.max_replicas,
        target_ongoing_requests=settings.target_ongoing_requests,
        min_replicas=settings.min_replicas,
        initial_replicas=settings.initial_replicas,
        look_back_period_s=settings.look_back_period_s,
    )


def start_attempts_option(expert: ExpertSettings) -> dict[str, Any]:
    """Serve's constructor retry bound, only when the config sets one (else Serve's)."""
    if expert.start_attempts is None:
        return {}
    return {"max_constructor_retry_count": expert.start_attempts}


def replica_version(*parts: Any) -> str:
    """A deployment version that changes exactly when the replica's arguments or code do.

    Serve restarts a deployment's replicas when its version changes and only calls
    `reconfigure` when just its `user_config` changed. Left to itself, `serve.run`
    gives every deployment a fresh random version, restarting every replica on
    every config change; a stable version keeps unchanged experts running.
    """
    encoded = json.dumps([_CODE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def _versioned(deployment: Deployment, *parts: Any) -> Deployment:
    return with_version(deployment, replica_version(deployment.name, *parts))


def build_app(config: CoEConfig, checkpoints: dict[str, Path]) -> Application:
    """Bind the deployment graph; nothing starts until Serve runs it."""
    # The API key never enters the dict every replica (and Serve's own status) sees.
    as_dict = config.model_dump(mode="json", exclude={"serve": {"api_key"}})
    placement = None
    if config.tiers.enabled:
        placement_deployment = PlacementDeployment.options(
            name=PLACEMENT_NAME,
            # Acquires wait for active slots inside the service: never queue them outside.
            max_ongoing_requests=10_000,
            ray_actor_options=placement_actor_options(config),
            # Replicas report residency every second; that is not access worth logging.
            logging_config={"enable_access_log": False},
            # New experts are registered in place; the arena and its residents stay.
            user_config={
                "config": as_dict,
                "checkpoints": {name: str(path) for name, path in checkpoints.items()},
            },
        )
        placement = _versioned(placement_deployment).bind()
    experts = {}
    for expert in config.dedicated_experts():
        autoscaling = autoscaling_config(expert.autoscaling)
        deployment = ExpertDeployment.options(
            name=expert_deployment_name(expert.name),
            autoscaling_config=autoscaling,
            max_ongoing_requests=expert.max_ongoing_requests,
            max_queued_requests=expert.max_queued_requests,
            ray_actor_options=expert.ray_actor_options.model_dump(exclude_none=True),
            **start_attempts_option(expert),
        )
        arguments = (expert.model_dump(mode="json"), str(checkpoints[expert.name]))
        experts[expert.name] = _versioned(deployment, *arguments, placement is not None).bind(
            *arguments, placement
        )
    executors = None
    pooled = config.executor_experts()
    if pooled:
        assert placement is not None  # the schema requires tiers for executors
        executors = executor_deployment(config, pooled, checkpoints, placement)
    router = _versioned(
        RouterDeployment.options(
            name=ROUTER_NAME,
            ray_actor_options={"num_cpus": config.router.num_cpus},
            # Two batches per replica: one classifying, the next filling. Serve's default
            # of 5 capped every batch at 5 prompts whatever max_batch_size said.
            max_ongoing_requests=2 * config.router.max_batch_size,
            # Past this a route is refused (429) rather than queued without bound.
            max_queued_requests=config.router.max_queued_requests,
            user_config=as_dict,  # a config change reconfigures the router in place
        )
    ).bind()
    ingress = IngressDeployment.options(
        name=INGRESS_NAME,
        ray_actor_options={"num_cpus": config.serve.ingress_num_cpus},
        # The ingress only awaits; the bound on work is each expert's queue. With Serve's
        # default of 5, five requests waiting on a slow expert stalled every other
        # request at the proxy, even ones refused in milliseconds (found by the soak).
        max_ongoing_requests=INGRESS_MAX_ONGOING,
    )
    api_key = config.serve.resolved_api_key()
    # Versioned like the others, so an apply that changes nothing it depends on keeps
    # its streams; the key enters the version only as its fingerprint.
    version_parts = (as_dict, key_fingerprint(api_key), placement is not None)
    return _versioned(ingress, *version_parts).bind(
        as_dict, router, experts, placement, api_key, executors, [e.name for e in pooled]
    )


# The executors' request router (ray's config model has untyped keyword arguments).
ROUTER_SETTINGS: dict[str, Any] = {
    "request_router_class": ROUTER_PATH,
    "request_routing_stats_period_s": STATS_PERIOD_S,
}


def placement_actor_options(config: CoEConfig) -> dict[str, Any]:
    """On GPU tiers the placement service keeps an arena on every GPU of its node: Ray
    puts it on a GPU node (a small share of one GPU) and leaves all of them visible."""
    if config.tiers.device != "cuda":
        return {"num_cpus": 0}
    return {
        "num_cpus": 0,
        "num_gpus": config.tiers.placement_num_gpus,
        "runtime_env": {"env_vars": SEE_EVERY_GPU},
    }


def executor_deployment(
    config: CoEConfig,
    pooled: list[ExpertSettings],
    checkpoints: dict[str, Path],
    placement: Application,
) -> Application:
    """The executor pool: one deployment serving every pooled expert (multiplexed)."""
    settings = config.executors
    if settings.max_replicas is not None and settings.max_replicas > settings.replicas:
        scaling: dict[str, Any] = {
            "autoscaling_config": {
                "min_replicas": settings.replicas,
                "max_replicas": settings.max_replicas,
                "target_ongoing_requests": settings.target_ongoing_requests,
            }
        }
    else:
        scaling = {"num_replicas": settings.replicas}
    deployment = ExecutorDeployment.options(
        name=EXECUTOR_NAME,
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        # Prefer an executor whose GPU holds the expert (one GPU or a CPU: Serve's choice).
        request_router_config=RequestRouterConfig(**ROUTER_SETTINGS),
        # The pooled experts arrive through reconfigure: adding or changing one keeps
        # the executors (and their streams) running.
        user_config={
            "experts": [e.model_dump(mode="json") for e in pooled],
            "checkpoints": {e.name: str(checkpoints[e.name]) for e in pooled},
        },
        **scaling,
    )
    arguments = (settings.max_experts_per_replica, settings.preload)
    return _versioned(deployment, *arguments).bind(placement, *arguments)


class BuilderArgs(BaseModel):
    """Arguments of `cluster.serve.app:app_builder` in a Serve config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    config: str = Field("configs/demo.yaml", description="CoE config file (YAML).")


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / `serve deploy`: validates, builds demo weights, binds."""
    try:
        parsed = BuilderArgs.model_validate(args)
    except ValidationError as error:
        raise ConfigError(f"bad application args {args!r}: {error}") from None
    config = load_config(parsed.config)
    checkpoints = prepare_checkpoints(config, progress=sayer(COE_PREFIX, flush=False))
    return build_app(config, checkpoints)
