"""An expert replica's side of the memory tiers: a model skeleton bound into a device arena.

The skeleton is built once on the `meta` device. The placement service copies the
expert's packed bytes into a region of the shared host arena and grants a lease; the
replica then only rebinds the skeleton's tensors as views into that region, and only
when the region's contents changed since it last bound them (a new generation, a
new region, or a restarted placement service).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memory_tiers.arena import DeviceArena
from memory_tiers.grants import Grant
from memory_tiers.hbm import Lease
from memory_tiers.packing import TensorIndex
from memory_tiers.placement import ResidencyReport
from memory_tiers.switch import ModelSkeleton


class TieredWeights:
    """Keeps one expert's model bound to wherever the placement service put its bytes."""

    def __init__(
        self, expert: str, checkpoint_dir: Path, dtype: str, index: TensorIndex, arena: DeviceArena
    ) -> None:
        self.expert = expert
        self.index = index
        self.arena = arena
        self.skeleton = ModelSkeleton.from_checkpoint(checkpoint_dir, dtype)
        self.bound: tuple[str, int, int] | None = None  # (incarnation, generation, offset)
        self.bound_lease: Lease | None = None
        self.rebinds = 0

    @property
    def model(self) -> Any:
        return self.skeleton.model

    def bind(self, grant: Grant) -> bool:
        """Point the model at the granted region; True when it had to rebind."""
        lease = grant.lease
        if lease.expert != self.expert:
            raise ValueError(f"a lease for {lease.expert!r} was given to expert {self.expert!r}")
        key = (grant.incarnation, lease.generation, lease.region.offset)
        self.bound_lease = lease
        if key == self.bound:
            return False
        self.skeleton.bind_buffer(self.arena.host_view(lease.region), self.index, lease.generation)
        self.bound = key
        self.rebinds += 1
        return True

    def report(self, in_use: bool) -> ResidencyReport | None:
        """What this replica believes is resident, for a restarted placement service."""
        lease = self.bound_lease
        if lease is None:
            return None
        return ResidencyReport(
            expert=lease.expert,
            device=lease.device,
            offset=lease.region.offset,
            nbytes=lease.region.nbytes,
            generation=lease.generation,
            lease_ids=(lease.lease_id,) if in_use else (),
        )
