"""The router replica: the two-step router behind Serve, classifying prompts in batches.

Every replica process imports the module that defines its class; this one needs the
router and its embedder (and so torch), but nothing of the ingress or the experts.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ray import serve

from cluster.config import parse_config
from cluster.setup_steps import build_router
from router.embed.embedder import LazyEmbedder
from router.two_step import RouteDecision, TwoStepRouter

logger = logging.getLogger("ray.serve")


class RouterReplica:
    """The two-step router; concurrent prompts are classified in one batch.

    The config arrives as Serve's `user_config`, so a changed map, new categories or
    new expert scores take effect through `reconfigure` without restarting the replica.
    """

    def __init__(self) -> None:
        self.router: TwoStepRouter | None = None
        self.embedder: LazyEmbedder | None = None
        self.reconfigurations = 0

    def reconfigure(self, config: dict[str, Any]) -> None:
        settings = parse_config(config)
        if self.embedder is None or self.embedder.name != settings.router.embedder:
            # Loaded on first use: a one-category config never embeds a prompt.
            self.embedder = LazyEmbedder(settings.router.embedder)
        self.router = build_router(settings, self.embedder)
        batched: Any = self.route  # serve.batch adds the setters at run time
        batched.set_max_batch_size(settings.router.max_batch_size)
        batched.set_batch_wait_timeout_s(settings.router.batch_wait_timeout_s)
        self.reconfigurations += 1
        logger.info(
            "router configured (%d): categories %s",
            self.reconfigurations,
            list(self.router.classifier.categories),
        )

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def route(self, prompts: list[str]) -> list[RouteDecision]:
        assert self.router is not None  # Serve reconfigures before the first request
        return await asyncio.to_thread(self.router.route_batch, prompts)

    def info(self) -> dict[str, Any]:
        assert self.router is not None
        return {
            "pid": os.getpid(),
            "reconfigurations": self.reconfigurations,
            "categories": list(self.router.classifier.categories),
            "mode": self.router.mode,
        }
