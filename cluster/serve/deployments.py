"""The Ray Serve deployments: experts, executors, the router, the placement service and the ingress.

Each replica class wraps a plain class from `actors/`, `router/` or
`cluster/ingress/service.py` and only adds what Serve needs (handles, threads for blocking
work). The classes live in one module per replica kind because Serve pickles a
class by reference: every replica process imports the module that defines its
class, and with one shared module every expert paid for the ingress's imports
(HTTP, gRPC, the router's classifier) and the ingress for torch. The `Deployment`
objects below are the only place the classes meet Serve.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Deployment

from cluster.serve.executor_replica import ExecutorReplica
from cluster.serve.expert_replica import ExpertReplica
from cluster.serve.handle_backend import HandleBackend
from cluster.serve.ingress_replica import IngressReplica
from cluster.serve.placement_client import PLACEMENT_RETRY_S
from cluster.serve.placement_replica import PlacementReplica
from cluster.serve.router_replica import RouterReplica

__all__ = [
    "PLACEMENT_RETRY_S",
    "ExecutorDeployment",
    "ExecutorReplica",
    "ExpertDeployment",
    "ExpertReplica",
    "HandleBackend",
    "IngressDeployment",
    "IngressReplica",
    "PlacementDeployment",
    "PlacementReplica",
    "RouterDeployment",
    "RouterReplica",
]

ExpertDeployment: Deployment = serve.deployment()(ExpertReplica)
ExecutorDeployment: Deployment = serve.deployment()(ExecutorReplica)
RouterDeployment: Deployment = serve.deployment()(RouterReplica)
PlacementDeployment: Deployment = serve.deployment()(PlacementReplica)
IngressDeployment: Deployment = serve.deployment()(serve.ingress()(IngressReplica))
