"""Region allocation and device arenas (in-process and shared file-backed)."""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_tiers.arena import DeviceArena, Region, RegionAllocator
from memory_tiers.errors import ArenaError


def _take(allocator: RegionAllocator, nbytes: int) -> Region:
    region = allocator.allocate(nbytes)
    assert region is not None, f"no room for {nbytes} bytes"
    return region


def test_allocator_is_aligned_first_fit() -> None:
    allocator = RegionAllocator(4096, alignment=256)
    a = _take(allocator, 100)
    b = _take(allocator, 300)
    c = _take(allocator, 256)
    assert (a, b, c) == (Region(0, 100), Region(256, 300), Region(768, 256))
    assert allocator.used_bytes == 256 + 512 + 256
    allocator.free(b)
    # First fit: the 512-byte hole left by b comes before the tail.
    assert allocator.allocate(200) == Region(256, 200)


def test_allocator_coalesces_neighbouring_holes() -> None:
    allocator = RegionAllocator(1024, alignment=256)
    regions = [_take(allocator, 256) for _ in range(4)]
    assert allocator.allocate(1) is None
    allocator.free(regions[1])
    allocator.free(regions[3])
    allocator.free(regions[2])
    assert allocator.holes() == [(256, 768)]
    assert allocator.allocate(768) == Region(256, 768)
    allocator.free(regions[0])
    assert allocator.largest_hole == 256


def test_allocator_reserve_claims_an_exact_region() -> None:
    allocator = RegionAllocator(2048, alignment=256)
    allocator.reserve(Region(512, 300))
    assert allocator.holes() == [(0, 512), (1024, 1024)]
    with pytest.raises(ArenaError, match="not free"):
        allocator.reserve(Region(768, 10))
    with pytest.raises(ArenaError, match="not aligned"):
        allocator.reserve(Region(100, 10))


def test_allocator_refuses_to_free_what_it_did_not_allocate() -> None:
    allocator = RegionAllocator(1024, alignment=256)
    region = allocator.allocate(10)
    assert region is not None
    allocator.free(region)
    with pytest.raises(ArenaError, match="not allocated"):
        allocator.free(region)
    assert allocator.used_bytes == 0


def test_allocator_copy_is_independent() -> None:
    allocator = RegionAllocator(1024, alignment=256)
    trial = allocator.copy()
    trial.allocate(1024)
    assert allocator.free_bytes == 1024 and trial.free_bytes == 0


def test_in_memory_arena_views_are_writable_and_shared() -> None:
    arena = DeviceArena.in_memory(4096)
    region = Region(256, 512)
    view = arena.host_view(region)
    view[:] = 7
    assert int(arena.tensor_view(region).sum()) == 7 * 512
    assert isinstance(arena.view(region), np.ndarray)
    with pytest.raises(ArenaError, match="outside"):
        arena.host_view(Region(4000, 512))


def test_file_arena_is_shared_between_mappings_and_outlives_them(tmp_path: Path) -> None:
    path = tmp_path / "arena.bin"
    creator = DeviceArena.create_file(path, 1 << 16)
    creator.host_view(Region(0, 4))[:] = [1, 2, 3, 4]
    replica = DeviceArena.attach_file(path)
    assert replica.capacity == 1 << 16
    assert replica.host_view(Region(0, 4)).tolist() == [1, 2, 3, 4]
    replica.host_view(Region(4096, 2))[:] = [9, 9]
    assert creator.host_view(Region(4096, 2)).tolist() == [9, 9]
    creator.close()
    replica.close()
    reopened = DeviceArena.open_file(path, 1 << 16)  # same size: attached, bytes kept
    assert reopened.host_view(Region(0, 4)).tolist() == [1, 2, 3, 4]
    reopened.close()
    resized = DeviceArena.open_file(path, 1 << 17)  # other size: created afresh
    assert resized.capacity == 1 << 17
    assert int(resized.host_view(Region(0, 4)).sum()) == 0
    resized.close()


def test_attach_to_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ArenaError, match=r"missing\.bin"):
        DeviceArena.attach_file(tmp_path / "missing.bin")


def test_bad_capacity_and_unavailable_cuda_are_clear_errors() -> None:
    with pytest.raises(ArenaError, match="positive"):
        DeviceArena.in_memory(0)
    if not torch.cuda.is_available():
        with pytest.raises(ArenaError, match="CUDA"):
            DeviceArena.cuda(1024)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 1500), st.integers(0, 99)), max_size=80))
def test_random_allocations_never_overlap_and_holes_stay_coalesced(
    ops: list[tuple[bool, int, int]],
) -> None:
    allocator = RegionAllocator(8192, alignment=256)
    live: list[Region] = []
    for allocate, nbytes, pick in ops:
        if allocate or not live:
            region = allocator.allocate(nbytes)
            if region is None:
                assert allocator.largest_hole < allocator.span(nbytes)
            else:
                live.append(region)
        else:
            allocator.free(live.pop(pick % len(live)))
        spans = sorted((r.offset, r.offset + allocator.span(r.nbytes)) for r in live)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
        assert allocator.used_bytes == sum(end - start for start, end in spans)
        holes = allocator.holes()
        assert sum(length for _, length in holes) == allocator.free_bytes
        for (offset, length), (next_offset, _) in itertools.pairwise(holes):
            assert offset + length < next_offset  # adjacent holes would have merged


def test_recreating_an_arena_leaves_an_old_mapping_intact(tmp_path: Path) -> None:
    path = tmp_path / "arena.bin"
    old = DeviceArena.create_file(path, 1 << 16)
    old.host_view(Region(0, 2))[:] = [5, 6]
    new = DeviceArena.create_file(path, 1 << 17)
    assert old.host_view(Region(0, 2)).tolist() == [5, 6]
    assert new.host_view(Region(0, 2)).tolist() == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arena.bin"]
    old.close()
    new.close()


def test_a_new_arena_file_is_private_and_leaves_no_staging_file(tmp_path: Path) -> None:
    path = tmp_path / "arena.bin"
    arena = DeviceArena.create_file(path, 1 << 16)
    status = os.lstat(path)
    assert stat.S_ISREG(status.st_mode) and stat.S_IMODE(status.st_mode) == 0o600
    assert status.st_uid == os.geteuid()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arena.bin"]
    arena.close()


def test_an_arena_file_that_is_not_ours_alone_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "arena.bin"
    DeviceArena.create_file(path, 1 << 16).close()
    link = tmp_path / "link.bin"
    link.symlink_to(path)
    with pytest.raises(ArenaError, match="symbolic link"):
        DeviceArena.attach_file(link)
    with pytest.raises(ArenaError, match="symbolic link"):
        DeviceArena.open_file(link, 1 << 16)  # the right size, but never through a link
    path.chmod(0o640)
    with pytest.raises(ArenaError, match="mode 0640"):
        DeviceArena.attach_file(path)
    with pytest.raises(ArenaError, match="mode 0640"):
        DeviceArena.open_file(path, 1 << 16)
    path.chmod(0o600)
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)
    with pytest.raises(ArenaError, match=f"owned by uid {me}"):
        DeviceArena.attach_file(path)


def test_a_read_only_attachment_sees_the_bytes_and_cannot_change_them(tmp_path: Path) -> None:
    path = tmp_path / "arena.bin"
    creator = DeviceArena.create_file(path, 1 << 16)
    creator.host_view(Region(0, 4))[:] = [1, 2, 3, 4]
    replica = DeviceArena.attach_file(path, writable=False)
    view = replica.host_view(Region(0, 4))
    assert view.tolist() == [1, 2, 3, 4] and not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[:] = 0
    creator.host_view(Region(0, 4))[:] = 9  # the placement service's writes show through
    assert view.tolist() == [9, 9, 9, 9]
    replica.close()
    creator.close()


def test_an_arena_larger_than_the_free_space_fails_before_any_page_is_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.statvfs(tmp_path)
    free_blocks = (1 << 20) // real.f_frsize  # 1 MiB free

    class Small:
        f_frsize = real.f_frsize
        f_bavail = free_blocks

    monkeypatch.setattr(os, "statvfs", lambda _path: Small())
    with pytest.raises(ArenaError, match=r"1\.0 MiB free but the arena needs 2\.0 MiB"):
        DeviceArena.create_file(tmp_path / "arena.bin", 2 << 20)
    assert list(tmp_path.iterdir()) == []
    DeviceArena.create_file(tmp_path / "arena.bin", 1 << 20).close()  # what fits is made
