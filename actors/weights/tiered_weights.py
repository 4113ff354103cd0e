"""A replica's side of the memory tiers: model skeletons bound into a device arena.

A skeleton is built once on the `meta` device. The placement service copies an
expert's packed bytes into a region of the shared arena (a host file, or a GPU's
memory mapped through CUDA IPC) and grants a lease; the replica then only rebinds the
skeleton's tensors as views into that region, and only when the region's contents
changed since it last bound them (another expert, a new generation, a new region, or
a restarted placement service, whose GPU arena is new memory the grant names).

Experts with the same architecture can share one skeleton (`SharedSkeleton`): an
executor keeps one per architecture, however many experts it runs, and binds each
request's expert into it. Whoever shares a skeleton must run one batch on it at a
time (`SharedSkeleton.lock`), since a bind re-points the one model every user sees.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory_tiers.arena import DeviceArena
from memory_tiers.ddr import PLAIN_LAYOUT
from memory_tiers.device_memory import ArenaShare
from memory_tiers.grants import Grant
from memory_tiers.hbm import Lease
from memory_tiers.packing import TensorIndex
from memory_tiers.placement import ResidencyReport
from memory_tiers.switch import ModelSkeleton

# Maps a grant's DDR object to its read-only buffer (the Serve layer injects ray.get).
Fetch = Callable[[Any], np.ndarray]

# What makes two checkpoints' skeletons interchangeable: the model's shape and its
# generation defaults (eos tokens and the like live in generation_config.json).
SKELETON_FILES = ("config.json", "generation_config.json")


def files_key(directory: Path, names: tuple[str, ...], salt: str = "") -> str:
    """A short digest of `directory`'s files `names` (their bytes, not their place)."""
    digest = hashlib.sha256(salt.encode())
    for name in names:
        path = directory / name
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"<absent>")
    return digest.hexdigest()[:16]


def skeleton_key(checkpoint_dir: Path, dtype: str, engine: str, layout: str = PLAIN_LAYOUT) -> str:
    """Experts with equal keys can share one skeleton (and one engine preparation)."""
    salt = f"{dtype}\0{engine}\0" + ("" if layout == PLAIN_LAYOUT else f"{layout}\0")
    return files_key(checkpoint_dir, SKELETON_FILES, salt)


def attach_device_arena(share: ArenaShare) -> DeviceArena:
    """Map a GPU arena (or its fake) once per process: experts and skeletons of one
    executor share the mapping, as they share the CUDA context."""
    found = _device_arenas.get(share.arena_id)
    if found is None:
        found = DeviceArena.attach(share)
        _device_arenas.clear()  # an older arena's owner is gone: its memory with it
        _device_arenas[share.arena_id] = found
    return found


_device_arenas: dict[str, DeviceArena] = {}


class SharedSkeleton:
    """One meta-device skeleton and which expert's region it is bound to right now."""

    def __init__(self, skeleton: ModelSkeleton, key: str) -> None:
        self.skeleton = skeleton
        self.key = key
        # (expert, incarnation, generation, offset) of the region the views point at.
        self.bound: tuple[str, str, int, int] | None = None
        # Held from bind to the end of the batch: another expert's bind would re-point
        # the tensors under a running generation.
        self.lock = asyncio.Lock()

    @property
    def model(self) -> Any:
        return self.skeleton.model


class TieredWeights:
    """Keeps one expert's model bound to wherever the placement service put its bytes."""

    def __init__(
        self,
        expert: str,
        index: TensorIndex,
        arena: DeviceArena | None,
        skeleton: SharedSkeleton,
        fetch: Fetch | None = None,
    ) -> None:
        """`arena` holds the granted regions; without one (a zero-copy device) each
        grant names the expert's DDR object and `fetch` maps it."""
        if arena is None and fetch is None:
            raise ValueError(f"expert {expert!r}: tiered weights need an arena or a fetch")
        self.expert = expert
        self.index = index
        self.arena = arena
        self.fetch = fetch
        self.shared = skeleton
        self.bound_lease: Lease | None = None
        self.rebinds = 0

    @property
    def model(self) -> Any:
        return self.shared.model

    @property
    def bound(self) -> tuple[str, int, int] | None:
        """(incarnation, generation, offset) this expert is bound to; None when the
        skeleton holds no region of this expert."""
        bound = self.shared.bound
        if bound is None or bound[0] != self.expert:
            return None
        return bound[1:]

    def bind(self, grant: Grant) -> bool:
        """Point the model at the granted region; True when it had to rebind."""
        lease = grant.lease
        if lease.expert != self.expert:
            raise ValueError(f"a lease for {lease.expert!r} was given to expert {self.expert!r}")
        key = (self.expert, grant.incarnation, lease.generation, lease.region.offset)
        self.bound_lease = lease
        if key == self.shared.bound:
            return False
        self.shared.bound = None  # a failed bind must not look like a good one
        self.shared.skeleton.bind_buffer(self._buffer(grant), self.index, lease.generation)
        self.shared.bound = key
        self.rebinds += 1
        return True

    def _buffer(self, grant: Grant) -> np.ndarray | torch.Tensor:
        """The granted bytes: the DDR object itself on a zero-copy device (the views keep
        it mapped), else the lease's region of the arena."""
        if grant.source is not None:
            if self.fetch is None:
                raise ValueError(f"expert {self.expert!r}: a zero-copy grant but no fetch")
            return self.fetch(grant.source)
        if grant.arena is not None and (
            self.arena is None or self.arena.arena_id != grant.arena.arena_id
        ):
            self.arena = attach_device_arena(grant.arena)
        if self.arena is None:
            raise ValueError(f"expert {self.expert!r}: an arena grant but no arena")
        return self.arena.view(grant.lease.region)

    def report(self, in_use: bool) -> ResidencyReport | None:
        """What this replica holds of this expert, for a restarted placement service:
        only a region the skeleton is bound to now (the others may be gone), and only
        of an arena (a zero-copy binding dies with the service's objects)."""
        lease = self.bound_lease
        if lease is None or self.bound is None or self.arena is None:
            return None
        return ResidencyReport(
            expert=lease.expert,
            device=lease.device,
            offset=lease.region.offset,
            nbytes=lease.region.nbytes,
            generation=lease.generation,
            lease_ids=(lease.lease_id,) if in_use else (),
        )
