"""The placement service as one Serve deployment (a single named Ray actor).

It owns every expert's packed weights in the object store (DDR), the shared host
arena of this node's device (HBM) and its active slots (SRAM). Expert replicas ask
it for a `Grant` per request; the ingress sends it prefetch hints as soon as the
router decides. Serve restarts it if it dies: the new incarnation repacks the
experts from their checkpoints, re-attaches the arena file and rebuilds residency
from the reports replicas send.

The placement logic is `memory_tiers.grant_service.GrantService`; this module gives
it what only Ray has (the Ray object store, this application's arena file, a probe
that asks Ray whether a grant holder's actor died, Serve's logger) and does the
Serve parts: configuration through `reconfigure`, and exporting the tier metrics.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ray.exceptions import ActorDiedError

from actors.engines.kernel_injection import checkpoint_source, packed_layout
from cluster.config import CoEConfig, parse_config
from cluster.serve.metrics import TierMetrics
from cluster.serve.object_store import RayObjectStore
from memory_tiers.arena import DEVICE_KINDS
from memory_tiers.arena_files import remove_stale, remove_unused
from memory_tiers.bulk_packing import PackOutcome, pack_many
from memory_tiers.ddr import ObjectStore, expert_source
from memory_tiers.grant_service import GrantService, HolderProbe, ReportVerdict
from memory_tiers.grants import Grant
from memory_tiers.placement import DeviceSpec, PlacementService, ResidencyReport

logger = logging.getLogger("ray.serve")

HOST_DEVICE = "host0"
GPU_DEVICE_PREFIX = "gpu"  # gpu0, gpu1, ...: the node's GPUs in CUDA's order
# Ray sets CUDA_VISIBLE_DEVICES to a replica's own share; the placement service must
# see every GPU of its node to keep an arena on each.
SEE_EVERY_GPU = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
# A holder that does not answer in time is busy or unreachable, not dead: only Ray's
# word that the actor died reclaims its grants.
HOLDER_PROBE_TIMEOUT_S = 10.0
# Checkpoints packed at once. One: transformers' `from_pretrained` is not thread-safe
# (it flips process-wide init flags and restores them on exit), and two loads in
# parallel threads left later loads in the process with untied embeddings.
PACK_WORKERS = 1


async def actor_is_dead(contact: Any) -> bool:
    """Whether the actor behind `contact` (an actor handle) is dead for good.

    A replica's actor is never restarted by Ray (Serve starts a new one instead), so
    `ActorDiedError` is final. A timeout or a transient `ActorUnavailableError` is not.
    """
    try:
        await asyncio.wait_for(contact.__ray_ready__.remote(), HOLDER_PROBE_TIMEOUT_S)
    except ActorDiedError:
        return True
    except Exception:  # busy, restarting network, unavailable for now: assume alive
        return False
    return False


# Characters of the node id that name a Ray cluster's arena files.
ARENA_ID_CHARS = 12


def arena_path(config: CoEConfig, cluster: str, device: str = HOST_DEVICE) -> Path:
    """The shared-memory file of `device`'s arena for this application in the Ray cluster
    `cluster` (`node_arena_id`): the same after a placement restart, never the same for
    two clusters or two applications."""
    name = f"coe-{config.serve.app_name}-{cluster}-{device}.arena"
    return Path(config.tiers.arena_dir) / name


def arena_files(config: CoEConfig, device: str = HOST_DEVICE) -> re.Pattern[str]:
    """The names `arena_path` gives this application's arena in any cluster."""
    app = re.escape(config.serve.app_name)
    return re.compile(rf"coe-{app}-[0-9a-f]{{{ARENA_ID_CHARS}}}-{re.escape(device)}\.arena")


def _ray_gpu_ids() -> list[Any]:
    import ray

    return list(ray.get_gpu_ids())


def _visible_gpus() -> int:
    import torch

    return int(torch.cuda.device_count())


def node_arena_id() -> str:
    """This node's id in this Ray cluster (random per start), as arena files name it."""
    import ray

    return str(ray.get_runtime_context().get_node_id())[:ARENA_ID_CHARS]


class PlacementReplica:
    """Serve-facing wrapper of `memory_tiers.grant_service.GrantService`."""

    def __init__(self) -> None:
        self.grants: GrantService | None = None
        self.settings: CoEConfig | None = None
        # Ray's pieces, replaceable so that tests run without a cluster.
        self.holder_is_dead: HolderProbe = actor_is_dead
        self.new_store: Callable[[], ObjectStore] = RayObjectStore
        self.arena_id: Callable[[], str] = node_arena_id
        self.gpu_ids: Callable[[], list[Any]] = _ray_gpu_ids
        self.gpu_count: Callable[[], int] = _visible_gpus
        self.gpu_arena: Literal["cuda", "fake"] = "cuda"  # "fake": a GPU stand-in in tests
        self.arena_file: Path | None = None
        self.tier_metrics = TierMetrics()

    @property
    def service(self) -> PlacementService | None:
        """The device's placement service (fault-injection tests reach its DDR store)."""
        return self.grants.placement if self.grants is not None else None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """First call: open the arena and pack every expert. Later calls (a config
        change): pack the experts that are new; the arena and its residents stay."""
        settings = parse_config(user_config["config"])
        checkpoints = {name: Path(path) for name, path in user_config["checkpoints"].items()}
        if self.grants is None:
            self.grants = self._start(settings)
        elif settings.tiers != self._tiers():
            logger.warning("placement: tiers settings changed; they apply after a restart")
        grants = self._require()
        # No request a grant serves is waited for past the request timeout, so no grant
        # needs to live longer; a changed timeout applies to the next grants.
        grants.grant_lifetime_s = settings.serve.request_timeout_s
        self._pack_new(grants, settings, checkpoints)
        if self.settings is None:
            grants.start()
        self.settings = settings

    def _pack_new(
        self, grants: GrantService, settings: CoEConfig, checkpoints: dict[str, Path]
    ) -> None:
        """Bring DDR in line with the config: remove the experts it no longer names, and
        pack the new ones and those whose checkpoint or dtype changed (their old bytes
        are never granted again), each checkpoint read once."""
        named = {e.name for e in settings.experts}
        for gone in sorted({*grants.placement.experts(), *grants.broken} - named):
            grants.unregister(gone)
        gpu = grants.placement.arena_kind(grants.device) in DEVICE_KINDS
        layouts = {
            e.name: packed_layout(e.engine, checkpoints[e.name], gpu) for e in settings.experts
        }
        new = [
            e
            for e in settings.experts
            if grants.source(e.name) != expert_source(checkpoints[e.name], e.dtype, layouts[e.name])
        ]
        if not new:
            return
        sources = {
            e.name: checkpoint_source(checkpoints[e.name], e.dtype, layouts[e.name]) for e in new
        }
        keys = {e.name: (str(checkpoints[e.name]), e.dtype, layouts[e.name]) for e in new}
        step = max(1, len(new) // 10)

        def packed(expert: str, outcome: PackOutcome) -> None:
            origin = f"checkpoint {checkpoints[expert]}"
            grants.register(expert, sources[expert], origin, outcome)

        def progress(done: int, total: int) -> None:
            if done % step == 0 or done == total:
                logger.info("placement: packed %d of %d checkpoints", done, total)

        started = time.monotonic()
        read = pack_many(sources, keys, packed, workers=PACK_WORKERS, progress=progress)
        logger.info(
            "placement: %d experts from %d checkpoints packed in %.1f s",
            len(new),
            read,
            time.monotonic() - started,
        )

    def _start(self, settings: CoEConfig) -> GrantService:
        tiers = settings.tiers
        assert tiers.hbm_budget_bytes is not None  # the schema requires it when enabled
        path = arena_path(settings, self.arena_id())
        # This application's arenas of clusters that are gone (a `coe serve` killed, a
        # `ray stop`): nobody maps them, they only hold memory. Our own is kept: after a
        # restart it still holds the residents.
        for stale in remove_stale(path.parent, arena_files(settings), keep=path):
            logger.warning("placement: removed %s, left behind by a stopped cluster", stale)
        specs: list[DeviceSpec]
        if tiers.device == "cuda":
            specs = self._gpu_specs(tiers.hbm_budget_bytes)
        elif tiers.cpu_binding == "zero_copy":
            specs = [DeviceSpec(HOST_DEVICE, tiers.hbm_budget_bytes, arena="object_store")]
        else:
            self.arena_file = path
            specs = [DeviceSpec(HOST_DEVICE, tiers.hbm_budget_bytes, arena="file", arena_path=path)]
        return GrantService(
            specs,
            self.new_store(),
            is_dead=self.holder_is_dead,
            policy=tiers.eviction,
            active_slots=tiers.active_slots,
            pinned=tiers.pinned,
            logger=logger,
            slot_wait_s=tiers.slot_wait_s,
            grant_lifetime_s=settings.serve.request_timeout_s,
        )

    def _gpu_specs(self, budget_bytes: int) -> list[DeviceSpec]:
        """One arena on every GPU of this node. Ray placed this replica on a GPU node (it
        asks for a share of one) but leaves every GPU of the node visible to it
        (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), so executors on any of them map
        their GPU's arena."""
        if not self.gpu_ids():
            raise RuntimeError(
                "tiers.device is 'cuda' but Ray gave the placement service no GPU: it asks "
                "for tiers.placement_num_gpus of one; is there a GPU node in the cluster?"
            )
        count = self.gpu_count()
        if count < 1:
            raise RuntimeError(
                "Ray gave the placement service a GPU but torch sees no GPU "
                "(torch.cuda.device_count() is 0): is torch's CUDA build installed?"
            )
        logger.info("placement: an arena of %d bytes on each of %d GPUs", budget_bytes, count)
        return [
            DeviceSpec(
                f"{GPU_DEVICE_PREFIX}{index}",
                budget_bytes,
                arena=self.gpu_arena,
                cuda_device=f"cuda:{index}",
            )
            for index in range(count)
        ]

    def __del__(self) -> None:
        """Serve calls this when it stops the replica (the application is deleted, Serve
        shuts down): the arena file goes once no replica maps it any more. A replica that
        dies never gets here, so its restart still finds the arena."""
        grants = getattr(self, "grants", None)
        if grants is None or self.arena_file is None:
            return
        grants.placement.close()
        if remove_unused(self.arena_file):
            logger.info("placement: removed %s", self.arena_file)

    def _tiers(self) -> Any:
        return self.settings.tiers if self.settings is not None else None

    def _require(self) -> GrantService:
        if self.grants is None:
            raise RuntimeError("the placement service has not been configured yet")
        return self.grants

    def _publish_tier_metrics(self) -> None:
        try:
            self.tier_metrics.publish(self.metrics())
        except Exception:  # metrics must never fail a grant
            logger.exception("placement: publishing tier metrics failed")

    # -- what replicas call --------------------------------------------------------

    def device_for(self, gpu_uuid: str | None) -> str:
        """The device a replica on the GPU `gpu_uuid` (None: no GPU) takes grants on."""
        return self._require().device_for(gpu_uuid)

    def describe(
        self, expert: str, source: str | None = None, device: str | None = None
    ) -> dict[str, Any]:
        """The arena and tensor index an expert replica binds against."""
        return self._require().describe(expert, source, device)

    async def acquire(
        self,
        expert: str,
        holder: str = "",
        contact: Any = None,
        source: str | None = None,
        device: str | None = None,
    ) -> Grant:
        """A grant for one request. `holder` (the replica's actor id) and `contact` (its
        actor handle) let the service take the grant back should the replica die;
        `source` is what the replica was built for (see GrantService.acquire); `device`
        is where the replica runs (`device_for`)."""
        return await self._require().acquire(expert, holder, contact, source, device)

    def release(self, grant: Grant) -> bool:
        """Give a grant back; False when it had already been taken back (see
        GrantService.release)."""
        released = self._require().release(grant)
        self._publish_tier_metrics()
        return released

    async def prefetch(self, expert: str) -> bool:
        copied = await self._require().prefetch(expert)
        self._publish_tier_metrics()
        return copied

    async def report(self, report: ResidencyReport, incarnation: str) -> ReportVerdict:
        """A replica says what an earlier incarnation granted it (see GrantService.report)."""
        return await self._require().report(report, incarnation)

    # -- operators -----------------------------------------------------------------

    def residency(self) -> dict[str, Any]:
        return self._require().residency()

    def metrics(self) -> dict[str, Any]:
        return self._require().metrics()

    def pin(self, expert: str) -> None:
        self._require().pin(expert)

    def unpin(self, expert: str) -> None:
        self._require().unpin(expert)
