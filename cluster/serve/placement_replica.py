"""The placement service as one Serve deployment (a single named Ray actor).

It owns every expert's packed weights in the object store (DDR), the shared host
arena of this node's device (HBM) and its active slots (SRAM). Expert replicas ask
it for a `Grant` per request; the ingress sends it prefetch hints as soon as the
router decides. Serve restarts it if it dies: the new incarnation repacks the
experts from their checkpoints, re-attaches the arena file and rebuilds residency
from the reports replicas send, accepting a report only when the arena still holds
exactly that expert's bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from ray.exceptions import ActorDiedError

from actors.weights.tiered_weights import Grant
from cluster.config import CoEConfig, parse_config
from cluster.serve.metrics import TierMetrics
from cluster.serve.object_store import RayObjectStore
from memory_tiers.arena import Region
from memory_tiers.ddr import CheckpointSource, ObjectStore
from memory_tiers.errors import ArenaError, ExpertUnavailable, TierError
from memory_tiers.grants import GrantLedger
from memory_tiers.hbm import Lease
from memory_tiers.packing import TensorIndex
from memory_tiers.placement import DeviceSpec, PlacementService, ResidencyReport
from memory_tiers.sram import ActiveSlots

logger = logging.getLogger("ray.serve")

HOST_DEVICE = "host0"
# After a restart, replicas report what they hold within this many seconds; switches
# that would overwrite arena bytes wait that long so a reported expert is not clobbered.
REPORT_INTERVAL_S = 1.0
RESTART_GRACE_S = 3 * REPORT_INTERVAL_S
# While grants are outstanding, their holders are checked this often: a replica that
# died mid-request gets its lease and active slot back within about this long.
HOLDER_CHECK_INTERVAL_S = 2.0
# A holder that does not answer in time is busy or unreachable, not dead: only Ray's
# word that the actor died reclaims its grants.
HOLDER_PROBE_TIMEOUT_S = 10.0

HolderProbe = Callable[[Any], Awaitable[bool]]


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


def arena_path(config: CoEConfig, device: str = HOST_DEVICE) -> Path:
    """The shared-memory file that holds `device`'s arena for this application."""
    return Path(config.tiers.arena_dir) / f"coe-{config.serve.app_name}-{device}.arena"


class PlacementReplica:
    """Serve-facing wrapper of `memory_tiers.placement.PlacementService`."""

    def __init__(self) -> None:
        self.service: PlacementService | None = None
        self.incarnation = uuid.uuid4().hex
        self.refused_reports = 0
        self.pinned: list[str] = []
        self.ready_at = 0.0
        self.restarted = False
        self.settings: CoEConfig | None = None
        self.ledger = GrantLedger()
        # Experts whose checkpoint could not be packed, and why: the others still serve.
        self.broken: dict[str, str] = {}
        self.holder_is_dead: HolderProbe = actor_is_dead
        self.new_store: Callable[[], ObjectStore] = RayObjectStore
        self._watcher: asyncio.Task[None] | None = None
        self.tier_metrics = TierMetrics()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """First call: open the arena and pack every expert. Later calls (a config
        change): pack the experts that are new; the arena and its residents stay."""
        settings = parse_config(user_config["config"])
        checkpoints = {name: Path(path) for name, path in user_config["checkpoints"].items()}
        if self.service is None:
            self._start(settings)
        elif settings.tiers != self._tiers():
            logger.warning("placement: tiers settings changed; they apply after a restart")
        service = self._require()
        for expert in settings.experts:
            if expert.name in service.experts():
                continue
            source = CheckpointSource(checkpoints[expert.name], expert.dtype)
            try:
                record = service.register(expert.name, source)
            except Exception as error:  # one bad checkpoint must not take down every expert
                self.broken[expert.name] = (
                    f"expert {expert.name!r} is unavailable: its checkpoint "
                    f"{checkpoints[expert.name]} could not be packed: "
                    f"{type(error).__name__}: {error}"
                )
                logger.error("placement: %s", self.broken[expert.name])
                continue
            self.broken.pop(expert.name, None)
            logger.info("placement: %s packed into DDR (%d bytes)", expert.name, record.nbytes)
        if self.settings is None:
            if self.restarted:
                # Replicas can reach this incarnation only from now on: the grace for
                # their reports starts here, not before the (slow) repacking above.
                self.ready_at = time.monotonic() + RESTART_GRACE_S
            else:
                for name in self.pinned:
                    if name not in self.broken:
                        service.pin(name, HOST_DEVICE)
                self.pinned = []
        self.settings = settings

    def _start(self, settings: CoEConfig) -> None:
        tiers = settings.tiers
        assert tiers.hbm_budget_bytes is not None  # the schema requires it when enabled
        path = arena_path(settings)
        self.restarted = path.is_file() and path.stat().st_size == tiers.hbm_budget_bytes
        spec = DeviceSpec(HOST_DEVICE, tiers.hbm_budget_bytes, arena="file", arena_path=path)
        self.service = PlacementService([spec], self.new_store(), tiers.eviction)
        self.slots = ActiveSlots(tiers.active_slots)
        self.pinned = list(tiers.pinned)

    def _tiers(self) -> Any:
        return self.settings.tiers if self.settings is not None else None

    def _require(self) -> PlacementService:
        if self.service is None:
            raise RuntimeError("the placement service has not been configured yet")
        return self.service

    async def _after_grace(self) -> None:
        delay = self.ready_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
            for name in self.pinned:  # pin once reported residents are known
                if name not in self.broken:
                    await asyncio.to_thread(self._require().pin, name, HOST_DEVICE)
            self.pinned = []

    # -- what replicas call --------------------------------------------------------

    def _check_available(self, expert: str) -> None:
        reason = self.broken.get(expert)
        if reason is not None:
            raise ExpertUnavailable(reason)

    def describe(self, expert: str) -> dict[str, Any]:
        """The arena file and tensor index an expert replica binds against."""
        self._check_available(expert)
        index: TensorIndex = self._require().index(expert)
        return {
            "device": HOST_DEVICE,
            "arena_path": str(self._require().arena_path(HOST_DEVICE)),
            "index": index.to_json(),
        }

    async def acquire(self, expert: str, holder: str = "", contact: Any = None) -> Grant:
        """A grant for one request. `holder` (the replica's actor id) and `contact` (its
        actor handle) let the service take the grant back should the replica die."""
        self._check_available(expert)
        await self._after_grace()
        started = time.perf_counter()
        slot = await self.slots.acquire(expert)
        waited = time.perf_counter() - started
        try:
            lease = await self._require().acquire_async(expert, HOST_DEVICE)
        except BaseException:
            self.slots.release(slot)
            raise
        if holder:
            # Recorded even when the caller is gone by now: the watcher reclaims it.
            self.ledger.record(holder, contact, lease, slot)
            self._watch_holders()
        return Grant(lease=lease, slot=slot, incarnation=self.incarnation, slot_wait_s=waited)

    def release(self, grant: Grant) -> None:
        if grant.incarnation != self.incarnation:
            # Granted by a previous incarnation: its lease came back through a report.
            self._release_lease(grant.lease)
        else:
            self.ledger.settle(grant.lease.lease_id)
            self._release_slot(grant.slot)
            self._release_lease(grant.lease)
        self._publish_tier_metrics()

    def _publish_tier_metrics(self) -> None:
        try:
            self.tier_metrics.publish(self.metrics())
        except Exception:  # metrics must never fail a grant
            logger.exception("placement: publishing tier metrics failed")

    def _release_slot(self, slot: int) -> None:
        try:
            self.slots.release(slot)
        except ValueError as error:  # already reclaimed: nothing left to give back
            logger.warning("placement: ignoring release of slot %d: %s", slot, error)

    def _release_lease(self, lease: Lease) -> None:
        try:
            self._require().release(lease)
        except TierError as error:  # an unknown lease after a restart is not fatal
            logger.warning("placement: ignoring release of %s: %s", lease.lease_id, error)

    # -- dead holders ----------------------------------------------------------------

    def _watch_holders(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_forever())

    async def _watch_forever(self) -> None:
        """Check holders while any grant is outstanding; stop when none is."""
        while self.ledger.outstanding():
            await asyncio.sleep(HOLDER_CHECK_INTERVAL_S)
            try:
                await self.reclaim_dead_holders()
            except Exception:  # keep watching; a failed check is retried next round
                logger.exception("placement: checking grant holders failed")

    async def reclaim_dead_holders(self) -> int:
        """End every grant whose holder died (lease and slot); returns how many."""
        contacts = self.ledger.contacts()
        verdicts = await asyncio.gather(*(self.holder_is_dead(c) for c in contacts.values()))
        reclaimed = 0
        for holder, dead in zip(contacts, verdicts, strict=True):
            if not dead:
                continue
            for held in self.ledger.reclaim(holder):
                self._release_slot(held.slot)
                self._release_lease(held.lease)
                reclaimed += 1
                logger.warning(
                    "placement: reclaimed lease %d on %s (and its active slot) from %s, "
                    "which died holding it",
                    held.lease.lease_id,
                    held.lease.expert,
                    holder,
                )
        return reclaimed

    async def prefetch(self, expert: str) -> bool:
        if expert in self.broken:
            return False
        await self._after_grace()
        copied = await asyncio.to_thread(self._require().prefetch, expert, HOST_DEVICE)
        self._publish_tier_metrics()
        return copied

    async def report(self, report: ResidencyReport, incarnation: str) -> bool:
        """A replica says what an earlier incarnation granted it; accepted when the arena
        really holds those bytes. Reports about this incarnation's own grants are news
        to nobody and are ignored (an evicted expert must stay evicted)."""
        if incarnation == self.incarnation:
            return False
        residency = self._require().residency()[report.device]
        if any(r.expert == report.expert for r in residency.residents):
            return False
        if not await asyncio.to_thread(self._holds_expert_bytes, report):
            self.refused_reports += 1
            return False
        refused = self._require().restore_from_reports([report])
        if refused:
            logger.warning("placement: report refused: %s", refused)
        return not refused

    def _holds_expert_bytes(self, report: ResidencyReport) -> bool:
        expected = self._require().ddr_buffer(report.expert)
        if expected.nbytes != report.nbytes:
            return False
        region = Region(report.offset, report.nbytes)
        try:
            held = self._require().arena(report.device).host_view(region)
        except ArenaError:  # a region outside this arena holds nothing of the expert
            return False
        return bool(np.array_equal(held, expected))

    # -- operators -----------------------------------------------------------------

    def residency(self) -> dict[str, Any]:
        return self._require().residency_json()

    def metrics(self) -> dict[str, Any]:
        return {
            **self._require().metrics(),
            "incarnation": self.incarnation,
            "refused_reports": self.refused_reports,
            "outstanding_grants": self.ledger.outstanding(),
            "reclaimed_grants": self.ledger.reclaimed,
            "broken": dict(self.broken),
            "slots": self.slots.stats().to_dict(),
        }

    def pin(self, expert: str) -> None:
        self._require().pin(expert, HOST_DEVICE)

    def unpin(self, expert: str) -> None:
        self._require().unpin(expert, HOST_DEVICE)
