"""Route a request to an executor whose GPU already holds its expert's bytes.

With an arena on every GPU of a node, the executors of the pool sit on different
devices, and an expert resident on one GPU costs a switch (a copy of its bytes) on any
other. Serve's own multiplexed routing prefers an executor that has the expert
*loaded* (its tokenizer and engine state, cheap to build) but knows nothing of where
the bytes are. This router ranks executors by both, from what each executor reports
(`record_routing_stats`: its device and the experts resident there):

1. executors whose device holds the expert and that have it loaded;
2. executors whose device holds the expert (building the engine state is cheap; a
   switch moves gigabytes);
3. Serve's multiplexed choice.

and then picks the less loaded of two among them, as Serve's power-of-two router does.
With one device (a CPU node) every executor reports the same residents, so the choice
is Serve's own. Imported by every process that holds a handle to the executors (the
ingress): Ray only, no torch.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

ROUTER_PATH = "cluster.serve.residency_router:ResidencyRouter"
# How often executors report their residents: a switch elsewhere is seen within this.
STATS_PERIOD_S = 1.0


def rank_by_residency(
    expert: str, stats: Mapping[ReplicaID, Mapping[str, Any]], loaded: Collection[ReplicaID]
) -> list[ReplicaID]:
    """The executors to choose from for `expert`, best class first (see the module
    docstring); empty when no executor's device holds it."""
    holding = [replica for replica, found in stats.items() if expert in found.get("resident", ())]
    both = [replica for replica in holding if replica in loaded]
    return both or holding


def two_choices(candidates: list[ReplicaID]) -> list[ReplicaID]:
    """Two distinct candidates at random (one when there is one): Serve probes both
    queue lengths and takes the shorter."""
    return random.sample(candidates, min(2, len(candidates)))


class ResidencyRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Serve's power-of-two router, preferring executors whose GPU holds the expert."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        expert = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if expert:
            loaded = self.apply_multiplex_routing(pending_request=pending_request)
            stats = {replica.replica_id: replica.routing_stats for replica in candidate_replicas}
            chosen = rank_by_residency(expert, stats, loaded) or list(loaded)
        else:
            chosen = list(self.apply_locality_routing(pending_request=pending_request))
        if not chosen:
            return []
        return [[self._replicas[replica] for replica in two_choices(chosen)]]
