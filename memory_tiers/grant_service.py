"""The placement protocol expert replicas follow, around a node's `PlacementService`.

One device (a host arena, a GPU) or several (every GPU of a node, each with its own
arena and active slots): a replica names its device, and one that names none gets the
first.

`GrantService` adds what serving needs on top of the placement service:

- a grant per request: an active slot (SRAM) paired with an HBM lease;
- experts whose source cannot be packed are marked unavailable, and the others serve;
- after a restart (the device's arena file survived), replicas report what an earlier
  incarnation granted them; a report is accepted only when the arena still holds
  exactly that expert's bytes, and switches wait out a grace period first so that a
  reported expert is not overwritten before its report arrives. Each binding is judged
  once (its verdict is kept, and the replica stops reporting it); a release that comes
  while its report is being judged is applied, not lost; a restored lease nobody gives
  back ends at the request deadline like any grant;
- grants are recorded under their holder and, while any is outstanding, the holders
  are checked with a liveness probe: a dead holder's leases and slots are taken back;
- a grant lives at most `grant_lifetime_s` (the request timeout: no request it serves
  can still be waited for after that), so a hung holder's grant is taken back too, and
  a request waits at most `slot_wait_s` for an active slot.

No Ray here: the cluster injects the object store, the arena file's device spec, the
liveness probe and the logger, and serves this class from its placement deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import numpy as np

from memory_tiers.arena import Region
from memory_tiers.ddr import ExpertSource, ObjectStore, Packed
from memory_tiers.device_memory import ArenaShare
from memory_tiers.errors import (
    ArenaError,
    ExpertUnavailable,
    SourceChanged,
    TierError,
    UnknownDevice,
)
from memory_tiers.grants import Grant, GrantLedger
from memory_tiers.hbm import Lease
from memory_tiers.placement import DeviceSpec, ExpertRecord, PlacementService, ResidencyReport
from memory_tiers.sram import ActiveSlots
from memory_tiers.tier_stats import total_slot_stats

# After a restart, replicas report what they hold within this many seconds; switches
# that would overwrite arena bytes wait that long so a reported expert is not clobbered.
REPORT_INTERVAL_S = 1.0
RESTART_GRACE_S = 3 * REPORT_INTERVAL_S
# While grants are outstanding, their holders are checked this often: a replica that
# died mid-request gets its lease and active slot back within about this long.
HOLDER_CHECK_INTERVAL_S = 2.0
# Longest a request waits for an active slot before it fails (SlotWaitTimeout); the
# same bound as a request's wait for room in the arena.
SLOT_WAIT_S = 120.0

# Whether the holder reachable through a contact is dead for good. Only a definite
# answer may say so: a busy or unreachable holder must count as alive.
HolderProbe = Callable[[Any], Awaitable[bool]]

# What the service answers a residency report. "current": it names this incarnation's
# own grant (nothing to restore; keep reporting, a later restart needs it). The others
# settle the binding for good, and its replica stops reporting it: "accepted" (restored),
# "known" (the expert is resident already), "refused" (the arena does not hold its bytes).
ReportVerdict = Literal["current", "accepted", "known", "refused"]
SETTLED_VERDICTS: frozenset[str] = frozenset({"accepted", "known", "refused"})
# (incarnation, device, expert, generation, offset, nbytes): one binding of a replica.
BindingKey = tuple[str, str, str, int, int, int]
# (incarnation, expert, generation, lease id): one lease of an earlier incarnation.
OldLeaseKey = tuple[str, str, int, int]


def arena_survived(device: DeviceSpec) -> bool:
    """Whether `device`'s arena file is already there at its full size: an earlier
    incarnation made it, and its residents may still be in it."""
    path = device.arena_path
    return (
        device.arena == "file"
        and path is not None
        and path.is_file()
        and path.stat().st_size == device.budget_bytes
    )


class GrantService:
    """Grants, residency reports and dead holders for one device (see module docstring)."""

    def __init__(
        self,
        device: DeviceSpec | Sequence[DeviceSpec],
        store: ObjectStore,
        *,
        is_dead: HolderProbe,
        policy: str = "lru",
        active_slots: int = 1,
        pinned: Sequence[str] = (),
        logger: logging.Logger | None = None,
        restart_grace_s: float = RESTART_GRACE_S,
        holder_check_interval_s: float = HOLDER_CHECK_INTERVAL_S,
        slot_wait_s: float | None = SLOT_WAIT_S,
        grant_lifetime_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        specs = [device] if isinstance(device, DeviceSpec) else list(device)
        self.devices = [spec.name for spec in specs]
        self.device = self.devices[0]  # what a replica that names no device gets
        # Checked before the arenas are opened.
        self.restarted = any(arena_survived(spec) for spec in specs)
        self.placement = PlacementService(specs, store, policy)
        self.device_slots = {name: ActiveSlots(active_slots, slot_wait_s) for name in self.devices}
        self.ledger = GrantLedger()
        self.incarnation = uuid.uuid4().hex
        self.is_dead = is_dead
        self.logger = logger or logging.getLogger(__name__)
        self.restart_grace_s = restart_grace_s
        self.holder_check_interval_s = holder_check_interval_s
        # How long a grant may be held (None: until given back); wall-clock seconds, since
        # the deadline travels to the replica in another process.
        self.grant_lifetime_s = grant_lifetime_s
        self.clock = clock
        self.pinned = list(pinned)  # pins not made yet
        self.ready_at = 0.0
        self.refused_reports = 0
        # Experts whose source could not be packed, and why: the others still serve.
        self.broken: dict[str, str] = {}
        self.holder_watch: asyncio.Task[None] | None = None
        # Restart bookkeeping. Verdicts already given, so that a binding reported every
        # second costs one byte comparison in all (bounded by the bindings replicas held
        # at the restart). Leases of earlier incarnations that ended (given back, or
        # taken back at their deadline), so a report judged later does not restore them.
        # Restored leases, and when they end if nobody gives them back (their holders
        # are in no ledger).
        self.verdicts: dict[BindingKey, ReportVerdict] = {}
        self.ended_old_leases: set[OldLeaseKey] = set()
        self.restored_leases: dict[OldLeaseKey, tuple[Lease, float]] = {}
        # Releases of old leases and restores run on different threads (Serve runs sync
        # methods off the event loop): one lock orders them.
        self.restore_lock = threading.Lock()

    # -- experts -------------------------------------------------------------------

    def has_expert(self, expert: str) -> bool:
        """Whether `expert` is packed into DDR (an unavailable one is not)."""
        return expert in self.placement.experts()

    def register(
        self,
        expert: str,
        source: ExpertSource,
        origin: str,
        packed: Packed | BaseException | None = None,
    ) -> ExpertRecord | None:
        """Pack `expert` into DDR; None, and the expert unavailable, when that fails.
        An expert registered already gets the new bytes (its source changed); its old
        bytes are never granted again.

        `origin` names where the bytes come from (e.g. "checkpoint /path") for the
        reason replicas get when they ask for the unavailable expert. `packed` is the
        source already packed (or the error packing it raised), when the caller packed
        several experts at once.
        """
        try:
            if isinstance(packed, BaseException):
                raise packed
            record = self.placement.register(expert, source, packed=packed)
        except Exception as error:  # one bad checkpoint must not take down every expert
            self.broken[expert] = (
                f"expert {expert!r} is unavailable: its {origin} could not be packed: "
                f"{type(error).__name__}: {error}"
            )
            self.logger.error("placement: %s", self.broken[expert])
            return None
        self.broken.pop(expert, None)
        self.logger.info("placement: %s packed into DDR (%d bytes)", expert, record.nbytes)
        return record

    def unregister(self, expert: str) -> None:
        """Remove `expert` (it left the config): unpinned, evicted once no grant holds it,
        its DDR copy freed; replicas asking for it get `UnknownExpert`."""
        self.broken.pop(expert, None)
        if expert in self.pinned:
            self.pinned.remove(expert)
        if self.has_expert(expert):
            self.placement.unregister(expert)
            self.logger.info("placement: %s removed", expert)

    def source(self, expert: str) -> str | None:
        """What `expert`'s bytes were packed from (its source's description), if packed."""
        return self.placement.record(expert).source if self.has_expert(expert) else None

    def _check_source(self, expert: str, source: str | None) -> None:
        """Refuse a replica that expects bytes of another source than the packed ones."""
        if source is None:
            return
        packed = self.source(expert)
        if packed != source:
            raise SourceChanged(
                f"expert {expert!r} is being updated: this replica serves {source}, the "
                f"placement service holds {packed or 'nothing yet'}; retry shortly"
            )

    def start(self) -> None:
        """Begin serving once the first experts are registered. After a restart, grants
        wait for the replicas' reports (the grace starts now, after the slow packing);
        otherwise the pinned experts are switched in at once."""
        if self.restarted:
            self.ready_at = time.monotonic() + self.restart_grace_s
            return
        for name in self.pinned:
            if name not in self.broken:
                self.pin(name)
        self.pinned = []

    async def _after_grace(self) -> None:
        delay = self.ready_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
            for name in self.pinned:  # pin once reported residents are known
                if name not in self.broken:
                    await asyncio.to_thread(self.pin, name)
            self.pinned = []

    @property
    def slots(self) -> ActiveSlots:
        """The default device's active slots (the only device's, on one device)."""
        return self.device_slots[self.device]

    def _device(self, device: str | None) -> str:
        if device is None:
            return self.device
        if device not in self.device_slots:
            raise UnknownDevice(f"unknown device {device!r}; devices: {self.devices}")
        return device

    def device_for(self, gpu_uuid: str | None) -> str:
        """The device whose arena is on the GPU `gpu_uuid` (what an executor Ray put on
        that GPU asks for); the default device for a replica without a GPU or a service
        without GPU arenas."""
        on_gpus = {}
        for name in self.devices:
            share = self.placement.arena_share(name)
            if share is not None and share.device_uuid is not None:
                on_gpus[share.device_uuid] = name
        if not on_gpus or gpu_uuid is None:
            return self.device
        found = on_gpus.get(gpu_uuid)
        if found is None:
            raise UnknownDevice(
                f"GPU {gpu_uuid} holds no arena of this placement service (its arenas are "
                f"on {sorted(on_gpus)}): executors must run on the placement service's node"
            )
        return found

    def _check_available(self, expert: str) -> None:
        reason = self.broken.get(expert)
        if reason is not None:
            raise ExpertUnavailable(reason)

    # -- what replicas call --------------------------------------------------------

    def describe(
        self, expert: str, source: str | None = None, device: str | None = None
    ) -> dict[str, Any]:
        """The arena file (None on a zero-copy device: grants carry the DDR object
        instead) and the tensor index an expert replica binds against. `source`: the
        source the replica was built for; `SourceChanged` when the packed one differs."""
        device = self._device(device)
        self._check_available(expert)
        self._check_source(expert, source)
        index = self.placement.index(expert)
        path = None if self.placement.zero_copy(device) else self.placement.arena_path(device)
        return {
            "device": device,
            "arena_path": str(path) if path is not None else None,
            "arena": self._device_share(device),
            "index": index.to_json(),
        }

    def _device_share(self, device: str) -> ArenaShare | None:
        """A device arena's share (a GPU's memory, mapped through CUDA IPC), which
        replicas map from a grant; None for a host arena file or a zero-copy device."""
        share = self.placement.arena_share(device)
        return share if share is not None and share.kind != "file" else None

    async def acquire(
        self,
        expert: str,
        holder: str = "",
        contact: Any = None,
        source: str | None = None,
        device: str | None = None,
    ) -> Grant:
        """A grant for one request. `holder` (the replica's id) and `contact` (what the
        liveness probe asks) let the service take the grant back should the replica die
        or hold it past its deadline (`Grant.expires_at`, set only for a holder's grant).
        Raises `SlotWaitTimeout` when no active slot frees up within `slot_wait_s`, and
        `SourceChanged` when `source` (what the replica was built for) is not what the
        expert's bytes were packed from: a replica never runs another source's bytes."""
        device = self._device(device)
        self._check_available(expert)
        self._check_source(expert, source)
        await self._after_grace()
        started = time.perf_counter()
        slots = self.device_slots[device]
        slot = await slots.acquire(expert)
        waited = time.perf_counter() - started
        try:
            lease = await self.placement.acquire_async(expert, device)
        except BaseException:
            slots.release(slot)
            raise
        try:
            self._check_source(expert, source)  # replaced while this request waited
        except SourceChanged:
            self._release_lease(lease)
            slots.release(slot)
            raise
        expires_at = None
        if holder:
            if self.grant_lifetime_s is not None:
                expires_at = self.clock() + self.grant_lifetime_s
            # Recorded even when the caller is gone by now: the watcher reclaims it.
            self.ledger.record(holder, contact, lease, slot, expires_at)
            self._watch_holders()
        source = None
        if self.placement.zero_copy(device):
            source = self.placement.ddr_ref(expert)
        return Grant(
            lease=lease,
            slot=slot,
            incarnation=self.incarnation,
            slot_wait_s=waited,
            expires_at=expires_at,
            source=source,
            arena=self._device_share(device),
        )

    def release(self, grant: Grant) -> bool:
        """Give a grant back; False when it had already been taken back (its holder was
        reported dead, or it outlived its deadline), and nothing is released twice."""
        if grant.incarnation != self.incarnation:
            return self._release_old_lease(grant)
        held = self.ledger.settle(grant.lease.lease_id)
        slots = self.device_slots.get(grant.lease.device)
        if held is None and (slots is None or not slots.holds(grant.slot)):
            self.logger.warning(
                "placement: lease %d on %s was given back after it had been taken back",
                grant.lease.lease_id,
                grant.lease.expert,
            )
            return False
        self._release_slot(grant.lease.device, grant.slot)
        self._release_lease(grant.lease)
        return True

    def _release_old_lease(self, grant: Grant) -> bool:
        """A lease of an earlier incarnation, restored from a report or not (yet): its
        slot died with that incarnation. One not restored yet is noted as ended, so that
        a report being judged now does not bring back a lease nobody holds any more."""
        lease = grant.lease
        key = (grant.incarnation, lease.expert, lease.generation, lease.lease_id)
        with self.restore_lock:
            if key in self.ended_old_leases:
                return False  # taken back at its deadline, or given back already
            self.ended_old_leases.add(key)
            self.restored_leases.pop(key, None)
            # Not restored (yet) raises TierError: noted above, so it never will be.
            with contextlib.suppress(TierError):
                self.placement.release(lease)
        return True

    def _release_slot(self, device: str, slot: int) -> None:
        try:
            self.device_slots[device].release(slot)
        except ValueError as error:  # already reclaimed: nothing left to give back
            self.logger.warning("placement: ignoring release of slot %d: %s", slot, error)

    def _release_lease(self, lease: Lease) -> None:
        try:
            self.placement.release(lease)
        except TierError as error:  # an unknown lease after a restart is not fatal
            self.logger.warning("placement: ignoring release of %s: %s", lease.lease_id, error)

    async def prefetch(self, expert: str) -> bool:
        """Start switching `expert` in ahead of its request; True if a copy was made.
        With several devices it does nothing: which GPU's executor takes the request is
        Serve's choice, made later, and a copy onto another GPU would only evict there."""
        if expert in self.broken or len(self.devices) > 1:
            return False
        await self._after_grace()
        return await asyncio.to_thread(self.placement.prefetch, expert, self.device)

    # -- restart -------------------------------------------------------------------

    async def report(self, report: ResidencyReport, incarnation: str) -> ReportVerdict:
        """A replica says what an earlier incarnation granted it; accepted when the arena
        really holds those bytes. Reports about this incarnation's own grants are news
        to nobody and are ignored (an evicted expert must stay evicted). A binding is
        judged once: its verdict is kept and given again at no cost."""
        if incarnation == self.incarnation:
            return "current"
        key = (
            incarnation,
            report.device,
            report.expert,
            report.generation,
            report.offset,
            report.nbytes,
        )
        verdict = self.verdicts.get(key)
        if verdict is None:
            verdict = await self._judge(report, incarnation)
            self.verdicts[key] = verdict
        return verdict

    async def _judge(self, report: ResidencyReport, incarnation: str) -> ReportVerdict:
        residency = self.placement.residency()[report.device]
        if any(r.expert == report.expert for r in residency.residents):
            return "known"
        if not await asyncio.to_thread(self._holds_expert_bytes, report):
            self.refused_reports += 1
            return "refused"
        with self.restore_lock:
            held = [
                lease_id
                for lease_id in report.lease_ids
                if (incarnation, report.expert, report.generation, lease_id)
                not in self.ended_old_leases
            ]
            refused = self.placement.restore_from_reports(
                [dataclasses.replace(report, lease_ids=tuple(held))]
            )
            if not refused:
                self._expire_restored(report, incarnation, held)
        if refused:
            self.logger.warning("placement: report refused: %s", refused)
            return "refused"
        return "accepted"

    def _expire_restored(
        self, report: ResidencyReport, incarnation: str, lease_ids: Sequence[int]
    ) -> None:
        """Give restored leases the deadline of a grant made now: their holders are in no
        ledger, so a holder that died or hung would otherwise keep the expert forever."""
        if self.grant_lifetime_s is None or not lease_ids:
            return
        expires_at = self.clock() + self.grant_lifetime_s
        region = Region(report.offset, report.nbytes)
        for lease_id in lease_ids:
            lease = Lease(lease_id, report.expert, report.device, region, report.generation, False)
            key = (incarnation, report.expert, report.generation, lease_id)
            self.restored_leases[key] = (lease, expires_at)
        self._watch_holders()

    def _holds_expert_bytes(self, report: ResidencyReport) -> bool:
        if self.placement.zero_copy(report.device) or not self.restarted:
            # No arena, or a new one (a GPU's memory dies with its owner): nothing an
            # earlier incarnation copied is here.
            return False
        expected = self.placement.ddr_buffer(report.expert)
        if expected.nbytes != report.nbytes:
            return False
        region = Region(report.offset, report.nbytes)
        try:
            held = self.placement.arena(report.device).read(region)
        except ArenaError:  # a region outside this arena holds nothing of the expert
            return False
        return bool(np.array_equal(held, expected))

    # -- dead holders ----------------------------------------------------------------

    def _watch_holders(self) -> None:
        if self.holder_watch is None or self.holder_watch.done():
            self.holder_watch = asyncio.get_running_loop().create_task(self._watch_forever())

    async def _watch_forever(self) -> None:
        """Check deadlines and holders while any grant is outstanding; stop when none is."""
        while self.ledger.outstanding() or self.restored_leases:
            await asyncio.sleep(self.holder_check_interval_s)
            self.reclaim_expired()
            try:
                await self.reclaim_dead_holders()
            except Exception:  # keep watching; a failed check is retried next round
                self.logger.exception("placement: checking grant holders failed")

    def reclaim_expired(self) -> int:
        """End every grant past its deadline (lease and slot); returns how many. The
        holder may be alive but hung: whatever it still computes, nobody waits for."""
        now = self.clock()
        expired = self.ledger.expire(now)
        for held in expired:
            self._release_slot(held.lease.device, held.slot)
            self._release_lease(held.lease)
            self.logger.warning(
                "placement: took back lease %d on %s (and its active slot) from %s, "
                "held past its deadline",
                held.lease.lease_id,
                held.lease.expert,
                held.holder,
            )
        return len(expired) + self._expire_restored_leases(now)

    def _expire_restored_leases(self, now: float) -> int:
        with self.restore_lock:
            due = [key for key, (_, at) in self.restored_leases.items() if at <= now]
            leases = [self.restored_leases.pop(key)[0] for key in due]
            self.ended_old_leases.update(due)
        for lease in leases:
            self._release_lease(lease)
            self.logger.warning(
                "placement: took back restored lease %d on %s, held past its deadline",
                lease.lease_id,
                lease.expert,
            )
        return len(leases)

    async def reclaim_dead_holders(self) -> int:
        """End every grant whose holder died (lease and slot); returns how many."""
        contacts = self.ledger.contacts()
        verdicts = await asyncio.gather(*(self.is_dead(c) for c in contacts.values()))
        reclaimed = 0
        for holder, dead in zip(contacts, verdicts, strict=True):
            if not dead:
                continue
            for held in self.ledger.reclaim(holder):
                self._release_slot(held.lease.device, held.slot)
                self._release_lease(held.lease)
                reclaimed += 1
                self.logger.warning(
                    "placement: reclaimed lease %d on %s (and its active slot) from %s, "
                    "which died holding it",
                    held.lease.lease_id,
                    held.lease.expert,
                    holder,
                )
        return reclaimed

    # -- operators -----------------------------------------------------------------

    def residency(self) -> dict[str, Any]:
        return self.placement.residency_json()

    def metrics(self) -> dict[str, Any]:
        return {
            **self.placement.metrics(),
            "incarnation": self.incarnation,
            "refused_reports": self.refused_reports,
            "outstanding_grants": self.ledger.outstanding(),
            "reclaimed_grants": self.ledger.reclaimed,
            "expired_grants": self.ledger.expired,
            "broken": dict(self.broken),
            "slots": total_slot_stats(s.stats() for s in self.device_slots.values()).to_dict(),
            "slots_by_device": {
                name: slots.stats().to_dict() for name, slots in self.device_slots.items()
            },
        }

    def pin(self, expert: str) -> None:
        """Keep `expert` resident on every device (a pinned expert never waits for a
        switch, whichever GPU serves it)."""
        for device in self.devices:
            self.placement.pin(expert, device)

    def unpin(self, expert: str) -> None:
        for device in self.devices:
            self.placement.unpin(expert, device)
