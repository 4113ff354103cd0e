"""The DDR tier: object store protocol, registration, rebuild from the source when lost."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from memory_tiers.ddr import CallableSource, DDRStore, InProcessObjectStore, Packed
from memory_tiers.errors import ObjectLost, UnknownExpert
from memory_tiers.packing import pack_module


class _CountingSource:
    def __init__(self, seed: int, delay_s: float = 0.0) -> None:
        self.seed = seed
        self.delay_s = delay_s
        self.builds = 0

    def build(self) -> Packed:
        self.builds += 1
        time.sleep(self.delay_s)
        torch.manual_seed(self.seed)
        return pack_module(torch.nn.Linear(8, 4))

    def describe(self) -> str:
        return f"seed {self.seed}"


def test_in_process_store_returns_read_only_arrays_and_loses_objects() -> None:
    store = InProcessObjectStore()
    ref = store.put(np.arange(4, dtype=np.uint8))
    got = store.get(ref)
    assert got.tolist() == [0, 1, 2, 3]
    assert not got.flags.writeable
    store.lose(ref)
    with pytest.raises(ObjectLost):
        store.get(ref)


def test_register_and_get_give_the_packed_bytes() -> None:
    source = _CountingSource(0)
    ddr = DDRStore(InProcessObjectStore())
    entry = ddr.register("e", source)
    buffer, index = ddr.get("e")
    expected, _ = _CountingSource(0).build()
    assert np.array_equal(buffer, expected)
    assert ddr.sizes() == {"e": index.total_bytes} and entry.nbytes == index.total_bytes


def test_a_lost_object_is_rebuilt_from_its_source_and_counted() -> None:
    store = InProcessObjectStore()
    source = _CountingSource(1)
    ddr = DDRStore(store)
    ddr.register("e", source)
    before, _ = ddr.get("e")
    before = before.copy()
    store.lose(ddr.entry("e").ref)
    after, _ = ddr.get("e")
    assert np.array_equal(before, after)
    assert ddr.rebuilds == 1 and source.builds == 2
    ddr.get("e")
    assert ddr.rebuilds == 1  # the new object is there now


def test_concurrent_gets_of_a_lost_object_rebuild_it_once() -> None:
    store = InProcessObjectStore()
    source = _CountingSource(2, delay_s=0.05)
    ddr = DDRStore(store)
    ddr.register("e", source)
    store.lose(ddr.entry("e").ref)
    threads = [threading.Thread(target=ddr.get, args=("e",)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ddr.rebuilds == 1 and source.builds == 2


def test_a_source_that_changed_on_disk_is_reported() -> None:
    store = InProcessObjectStore()
    seeds = iter([0, 1])

    def build() -> Packed:
        torch.manual_seed(0)
        return pack_module(torch.nn.Linear(8, 4 * next(seeds) + 4))

    ddr = DDRStore(store)
    ddr.register("e", CallableSource(build, "changing"))
    store.lose(ddr.entry("e").ref)
    with pytest.raises(ObjectLost, match="changed on disk"):
        ddr.get("e")


def test_unknown_experts_are_named() -> None:
    ddr = DDRStore(InProcessObjectStore())
    with pytest.raises(UnknownExpert, match="'nope'"):
        ddr.get("nope")


def test_unregister_frees_the_object() -> None:
    store = InProcessObjectStore()
    ddr = DDRStore(store)
    ddr.register("e", _CountingSource(0))
    assert len(store) == 1
    ddr.unregister("e")
    assert len(store) == 0 and ddr.experts() == []
