"""What only a GPU can show: a CUDA arena mapped by another process through its IPC
handle, and the staged host -> device copy. Skipped without CUDA; run by
benchmarks/device_check.sh on a GPU machine."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from memory_tiers.arena import DeviceArena, Region
from memory_tiers.placement import DeviceSpec, PlacementService
from memory_tiers.switch import copy_into

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Another process maps the arena from its share and prints the sum of a region.
READER = """
import pickle, sys
from memory_tiers.arena import DeviceArena, Region
share = pickle.loads(sys.stdin.buffer.read())
arena = DeviceArena.attach(share)
offset, nbytes = int(sys.argv[1]), int(sys.argv[2])
print(int(arena.tensor_view(Region(offset, nbytes)).sum().item()))
"""


def _read_in_another_process(arena: DeviceArena, region: Region) -> int:
    done = subprocess.run(
        [sys.executable, "-c", READER, str(region.offset), str(region.nbytes)],
        input=pickle.dumps(arena.share()),
        capture_output=True,
        check=True,
    )
    return int(done.stdout.decode().strip())


def test_another_process_reads_the_bytes_copied_into_the_arena() -> None:
    arena = DeviceArena.cuda(1 << 20)
    source = np.random.default_rng(1).integers(0, 255, 300_000, dtype=np.uint8)
    region = Region(4096, source.size)
    copy_into(arena.view(region), source)
    torch.cuda.synchronize()
    assert _read_in_another_process(arena, region) == int(source.sum(dtype=np.int64))


def test_the_staged_copy_is_exact_across_chunks() -> None:
    from memory_tiers import switch

    arena = DeviceArena.cuda(1 << 22)
    source = np.random.default_rng(2).integers(0, 255, 3_000_001, dtype=np.uint8)
    region = arena.tensor_view(Region(0, source.size))
    switch._copy_to_cuda(region, source, chunk_bytes=1 << 20)  # three chunks and a bit
    torch.cuda.synchronize()
    assert np.array_equal(region.cpu().numpy(), source)


def test_the_placement_service_owns_the_gpu_arena_and_shares_it() -> None:
    from memory_tiers.ddr import CallableSource, InProcessObjectStore
    from memory_tiers.packing import pack_module

    model = torch.nn.Linear(64, 64)
    packed = pack_module(model)
    service = PlacementService(
        [DeviceSpec("gpu0", 1 << 20, arena="cuda", cuda_device="cuda:0")],
        InProcessObjectStore(),
    )
    service.register("a", CallableSource(lambda: packed))
    lease = service.acquire("a", "gpu0")
    arena = service.arena("gpu0")
    share = service.arena_share("gpu0")
    assert share is not None and share.kind == "cuda"
    assert share.device_uuid == str(torch.cuda.get_device_properties(0).uuid)
    expected = int(packed[0].sum(dtype=np.int64))
    assert _read_in_another_process(arena, lease.region) == expected
    service.release(lease)


def test_concurrent_switches_do_not_mix_their_bytes() -> None:
    """The placement service copies several experts at once (on worker threads); each
    region must end up with its own expert's bytes."""
    import threading

    arena = DeviceArena.cuda(1 << 24)
    sources = [
        np.random.default_rng(seed).integers(0, 255, 5_000_000, dtype=np.uint8) for seed in range(3)
    ]
    regions = [Region(i * (5 << 20), 5_000_000) for i in range(3)]
    threads = [
        threading.Thread(target=copy_into, args=(arena.view(region), source))
        for region, source in zip(regions, sources, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.cuda.synchronize()
    for region, source in zip(regions, sources, strict=True):
        assert np.array_equal(arena.read(region), source)
