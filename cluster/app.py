"""Builds the Serve application from a config: one deployment per expert, a router, an ingress.

`app_builder` is the import path `serve run` and `serve deploy` use
(`cluster.app:app_builder`, with `args: {config: ...}`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray.serve import Application

from cluster.config import CoEConfig, ConfigError, load_config
from cluster.deployments import (
    ExpertDeployment,
    IngressDeployment,
    PlacementDeployment,
    RouterDeployment,
)
from cluster.setup_steps import prepare_checkpoints

INGRESS_NAME = "ingress"
ROUTER_NAME = "router"
PLACEMENT_NAME = "placement"


def expert_deployment_name(expert: str) -> str:
    return f"expert-{expert}"


def build_app(config: CoEConfig, checkpoints: dict[str, Path]) -> Application:
    """Bind the deployment graph; nothing starts until Serve runs it."""
    as_dict = config.model_dump(mode="json")
    placement = None
    if config.tiers.enabled:
        placement = PlacementDeployment.options(
            name=PLACEMENT_NAME,
            # Acquires wait for active slots inside the service: never queue them outside.
            max_ongoing_requests=10_000,
            ray_actor_options={"num_cpus": 0},
            # Replicas report residency every second; that is not access worth logging.
            logging_config={"enable_access_log": False},
        ).bind(as_dict, {name: str(path) for name, path in checkpoints.items()})
    experts = {}
    for expert in config.experts:
        autoscaling = expert.autoscaling.model_dump(exclude_none=True)
        deployment = ExpertDeployment.options(
            name=expert_deployment_name(expert.name),
            autoscaling_config=autoscaling,
            max_ongoing_requests=expert.max_ongoing_requests,
            ray_actor_options=expert.ray_actor_options.model_dump(exclude_none=True),
        )
        experts[expert.name] = deployment.bind(
            expert.model_dump(mode="json"), str(checkpoints[expert.name]), placement
        )
    router = RouterDeployment.options(
        name=ROUTER_NAME, ray_actor_options={"num_cpus": config.router.num_cpus}
    ).bind(as_dict)
    ingress = IngressDeployment.options(
        name=INGRESS_NAME, ray_actor_options={"num_cpus": config.serve.ingress_num_cpus}
    )
    return ingress.bind(as_dict, router, experts, placement)


class BuilderArgs(BaseModel):
    """Arguments of `cluster.app:app_builder` in a Serve config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    config: str = Field("configs/demo.yaml", description="CoE config file (YAML).")


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / `serve deploy`: validates, builds demo weights, binds."""
    try:
        parsed = BuilderArgs.model_validate(args)
    except ValidationError as error:
        raise ConfigError(f"bad application args {args!r}: {error}") from None
    config = load_config(parsed.config)
    checkpoints = prepare_checkpoints(config, progress=lambda line: print(f"[coe] {line}"))
    return build_app(config, checkpoints)
