"""Sharing an arena between processes: files by path, GPU memory by CUDA IPC handle,
and the fake device that stands in for a GPU in unit tests."""

from __future__ import annotations

import gc
import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from memory_tiers import device_memory
from memory_tiers.arena import DeviceArena, Region
from memory_tiers.device_memory import ArenaShare
from memory_tiers.errors import ArenaError


def test_a_fake_device_arena_is_mapped_as_the_same_memory() -> None:
    owner = DeviceArena.fake_device(4096)
    mapped = DeviceArena.attach(owner.share())
    assert mapped.arena_id == owner.arena_id
    region = Region(1024, 16)
    owner.view(region).copy_(torch.arange(16, dtype=torch.uint8))
    assert isinstance(mapped.view(region), torch.Tensor)
    assert mapped.read(region).tolist() == list(range(16))


def test_a_fake_device_arena_is_gone_with_its_owner() -> None:
    """As CUDA memory is once the exporting process is gone: mapping fails by name."""
    owner = DeviceArena.fake_device(4096)
    share = owner.share()
    owner.close()
    del owner
    gc.collect()
    with pytest.raises(ArenaError, match="is gone"):
        DeviceArena.attach(share)


def test_a_file_arena_is_shared_by_path_and_mapped_read_only(tmp_path: Path) -> None:
    owner = DeviceArena.create_file(tmp_path / "arena", 8192)
    share = owner.share()
    assert share.kind == "file" and share.path == str(tmp_path / "arena")
    owner.host_view(Region(0, 4))[:] = [1, 2, 3, 4]
    mapped = DeviceArena.attach(share)
    assert mapped.read(Region(0, 4)).tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        mapped.host_view(Region(0, 4))[:] = 0
    mapped.close()
    owner.close()


def test_a_private_arena_cannot_be_shared() -> None:
    with pytest.raises(ArenaError, match="private"):
        DeviceArena.in_memory(4096).share()


def test_every_arena_gets_its_own_id() -> None:
    assert DeviceArena.fake_device(64).arena_id != DeviceArena.fake_device(64).arena_id
    assert DeviceArena.in_memory(64).arena_id != DeviceArena.in_memory(64).arena_id


def _gpus(monkeypatch: pytest.MonkeyPatch, uuids: list[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(uuids))
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: SimpleNamespace(uuid=uuids[torch.device(device).index or 0]),
    )


def test_a_gpu_is_found_by_uuid_whatever_its_index_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's CUDA_VISIBLE_DEVICES renumbers GPUs per process: the arena's GPU is named
    by its uuid, and each process finds its own index for it."""
    _gpus(monkeypatch, ["GPU-aaa", "GPU-bbb"])
    assert device_memory.local_index("GPU-bbb") == 1
    share = ArenaShare("cuda", 64, "id", device_uuid="GPU-ccc", handle=(None,) * 15)
    with pytest.raises(ArenaError, match=r"GPU-ccc, which this process does not see"):
        device_memory.import_cuda(share)


def test_a_cuda_share_without_cuda_is_refused_by_name() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    share = ArenaShare("cuda", 64, "id", device_uuid="GPU-aaa", handle=(None,) * 15)
    with pytest.raises(ArenaError, match="CUDA is not available"):
        DeviceArena.attach(share)


def test_the_ipc_rebuild_takes_the_device_where_the_import_puts_this_process() -> None:
    """`import_cuda` replaces the exporter's device index in torch's rebuild arguments;
    the position is torch's, so a torch that moves it must fail here, not on a GPU."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    names = list(inspect.signature(rebuild_cuda_tensor).parameters)
    assert names[device_memory._STORAGE_DEVICE_ARG] == "storage_device"


def test_a_device_arena_copy_lands_in_the_region(tmp_path: Path) -> None:
    from memory_tiers.switch import copy_into

    arena = DeviceArena.fake_device(8192)
    source = np.arange(100, dtype=np.uint8)
    copy_into(arena.view(Region(4096, 100)), source)
    assert np.array_equal(arena.read(Region(4096, 100)), source)
