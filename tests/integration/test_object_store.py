"""The DDR tier on the real Ray object store: zero-copy reads, and lost objects rebuilt."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors.weights.synthetic import build_tiny_expert
from cluster.serve.object_store import RayObjectStore
from memory_tiers.ddr import CheckpointSource, DDRStore
from memory_tiers.errors import ObjectLost
from tests.integration.conftest import RunningCluster

pytestmark = pytest.mark.integration


class OwnedElsewhere(RayObjectStore):
    """The real Ray store, but each object is put (and so owned) by a separate actor,
    so killing that actor loses the object exactly as a dead owner or node would."""

    def __init__(self) -> None:
        self.owner = self._new_owner()

    @staticmethod
    def _new_owner() -> Any:
        import ray

        @ray.remote(num_cpus=0)
        class Owner:
            def put(self, array: np.ndarray) -> list[Any]:
                return [ray.put(array)]  # wrapped so the caller gets the ref, not the value

        return Owner.remote()

    def put(self, array: np.ndarray) -> Any:
        import ray

        return ray.get(self.owner.put.remote(array))[0]

    def kill_owner(self) -> None:
        import ray

        ray.kill(self.owner, no_restart=True)
        self.owner = self._new_owner()  # later puts (the rebuild) need a live owner


def test_reads_are_zero_copy_and_read_only(cluster: RunningCluster) -> None:
    store = RayObjectStore()
    data = np.arange(1 << 20, dtype=np.uint8)
    ref = store.put(data)
    first, second = store.get(ref), store.get(ref)
    assert np.array_equal(first, data)
    assert not first.flags.writeable
    # Two reads map the same shared memory: no copy was made.
    assert first.__array_interface__["data"][0] == second.__array_interface__["data"][0]


def test_lost_object_is_rebuilt_from_the_checkpoint(
    cluster: RunningCluster, demo_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    tokenizer = demo_checkpoints["generalist"]
    checkpoint = build_tiny_expert(tmp_path / "tiny", seed=7, tokenizer_dir=tokenizer)
    store = OwnedElsewhere()
    ddr = DDRStore(store)
    source = CheckpointSource(checkpoint)
    original, _ = source.build()  # packing is deterministic: what the store must hold
    entry = ddr.register("tiny", source)

    store.kill_owner()
    deadline = time.monotonic() + 60
    while True:  # the owner's death reaches this process within moments
        try:
            store.get(entry.ref)
        except ObjectLost:
            break
        assert time.monotonic() < deadline, "the object outlived its owner"
        time.sleep(0.5)

    rebuilt, index = ddr.get("tiny")
    assert ddr.rebuilds == 1
    assert index.to_json() == entry.index.to_json()
    assert np.array_equal(rebuilt, original)
