"""Device arenas: one pre-allocated block of device memory, carved into regions.

A device's HBM budget is one arena allocated once. On a CPU-only node it is a
file-backed shared mapping (in /dev/shm) that the placement service creates and
pre-faults and every expert replica on the node attaches read-only, so they share its
bytes and the bytes outlive a placement-service restart. The file is private to the
user running the cluster: created exclusively with mode 0600, attached only while it
still is. In one process it can be a plain numpy array. On a GPU it is one
``torch.empty(capacity, uint8, device="cuda:N")`` the placement service allocates and
the executors on that GPU map through CUDA IPC (``share`` / ``attach``, see
``device_memory.py``); a "fake" device stands in for it in tests.

``RegionAllocator`` is the bookkeeping only (aligned first-fit with coalescing); the
HBM cache owns one per device and never touches memory.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import mmap
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from memory_tiers.device_memory import (
    ArenaShare,
    export_cuda,
    fake_device_tensor,
    import_cuda,
    import_fake,
    new_arena_id,
)
from memory_tiers.errors import ArenaError
from memory_tiers.packing import ALIGNMENT, align_up

PAGE_BYTES = mmap.PAGESIZE
# A new arena file: ours alone, never a file or link someone left at its name.
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
ArenaKind = Literal["memory", "file", "cuda", "fake"]
# Arenas whose memory is a torch tensor on a device (views are tensors, not numpy).
DEVICE_KINDS = frozenset({"cuda", "fake"})


@dataclass(frozen=True, order=True)
class Region:
    """``nbytes`` bytes at ``offset`` of an arena (the allocator reserves them aligned up)."""

    offset: int
    nbytes: int

    def to_json(self) -> dict[str, int]:
        return {"offset": self.offset, "nbytes": self.nbytes}


class RegionAllocator:
    """Aligned first-fit allocation over ``capacity`` bytes, coalescing freed holes."""

    def __init__(self, capacity: int, alignment: int = ALIGNMENT) -> None:
        if capacity <= 0:
            raise ArenaError(f"arena capacity must be positive, got {capacity}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ArenaError(f"alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self.capacity = capacity - capacity % alignment
        self._holes: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []
        self._spans: dict[int, int] = {}

    def span(self, nbytes: int) -> int:
        """Bytes a region of ``nbytes`` occupies."""
        return align_up(max(nbytes, 1), self.alignment)

    def copy(self) -> RegionAllocator:
        clone = RegionAllocator.__new__(RegionAllocator)
        clone.alignment = self.alignment
        clone.capacity = self.capacity
        clone._holes = list(self._holes)
        clone._spans = dict(self._spans)
        return clone

    @property
    def used_bytes(self) -> int:
        return sum(self._spans.values())

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    @property
    def largest_hole(self) -> int:
        return max((length for _, length in self._holes), default=0)

    def allocate(self, nbytes: int) -> Region | None:
        """The first hole that fits, or None."""
        if nbytes < 0:
            raise ArenaError(f"cannot allocate a negative size ({nbytes})")
        need = self.span(nbytes)
        for position, (offset, length) in enumerate(self._holes):
            if length >= need:
                if length == need:
                    del self._holes[position]
                else:
                    self._holes[position] = (offset + need, length - need)
                self._spans[offset] = need
                return Region(offset, nbytes)
        return None

    def reserve(self, region: Region) -> None:
        """Claim exactly ``region`` (restoring residency reported after a restart)."""
        need = self.span(region.nbytes)
        if region.offset % self.alignment or region.offset < 0:
            raise ArenaError(f"region offset {region.offset} is not aligned to {self.alignment}")
        end = region.offset + need
        for position, (offset, length) in enumerate(self._holes):
            if offset <= region.offset and end <= offset + length:
                pieces = [(offset, region.offset - offset), (end, offset + length - end)]
                self._holes[position : position + 1] = [p for p in pieces if p[1] > 0]
                self._spans[region.offset] = need
                return
        raise ArenaError(
            f"region [{region.offset}, {end}) is not free in an arena of {self.capacity} bytes"
        )

    def free(self, region: Region) -> None:
        span = self._spans.pop(region.offset, None)
        if span is None or span != self.span(region.nbytes):
            if span is not None:
                self._spans[region.offset] = span
            raise ArenaError(f"region {region} is not allocated")
        position = bisect.bisect_left(self._holes, (region.offset, 0))
        offset, length = region.offset, span
        if position < len(self._holes) and self._holes[position][0] == offset + length:
            length += self._holes.pop(position)[1]
        if position > 0:
            before_offset, before_length = self._holes[position - 1]
            if before_offset + before_length == offset:
                offset, length = before_offset, before_length + length
                position -= 1
                del self._holes[position]
        self._holes.insert(position, (offset, length))

    def holes(self) -> list[tuple[int, int]]:
        return list(self._holes)


class DeviceArena:
    """The memory of one device's budget; ``view(region)`` gives zero-copy access to it."""

    def __init__(
        self,
        kind: ArenaKind,
        capacity: int,
        host: np.ndarray | None = None,
        device_tensor: torch.Tensor | None = None,
        path: Path | None = None,
        mapping: mmap.mmap | None = None,
        lock: int | None = None,
        arena_id: str | None = None,
    ) -> None:
        self.kind = kind
        # New for every allocation: a replica tells a new arena from the one it mapped.
        self.arena_id = arena_id or new_arena_id()
        self._share: ArenaShare | None = None
        self.capacity = capacity
        self.path = path
        self._host = host
        self._device_tensor = device_tensor
        self._mapping = mapping
        # A file arena's descriptor, holding a shared flock for as long as this process
        # maps the file: a file nobody locks is mapped by nobody (see arena_files.py).
        self._lock = lock

    # -- construction ------------------------------------------------------------

    @classmethod
    def in_memory(cls, capacity: int) -> DeviceArena:
        """A private arena in this process (single-process use, tests)."""
        _check_capacity(capacity)
        host = np.empty(capacity, dtype=np.uint8)
        host.fill(0)  # fault every page in now, not on the first switch
        return cls("memory", capacity, host=host)

    @classmethod
    def create_file(cls, path: Path, capacity: int) -> DeviceArena:
        """Create (or replace) a shared file-backed arena and pre-fault it.

        The file is ours alone: it is built under a fresh random name, created
        exclusively (a file or link already there is never written through) with mode
        0600, then renamed into place, so a process still mapping an older arena at
        ``path`` keeps its own bytes intact. The file system must have room for all of
        it first: pre-faulting a file larger than a tmpfs's free space kills the
        process with SIGBUS, so that fails here with ``ArenaError`` instead.
        """
        _check_capacity(capacity)
        path = Path(path)
        _check_room(path.parent, capacity)
        staging = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
        try:
            descriptor = os.open(staging, _CREATE_FLAGS, 0o600)
        except OSError as error:
            raise ArenaError(f"cannot create arena file {path}: {error}") from error
        arena = None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH)  # in use from before it has its name
            os.ftruncate(descriptor, capacity)
            arena = cls._map(path, descriptor, capacity, populate=False)
            assert arena._host is not None
            arena._host[::PAGE_BYTES] = 0  # allocate every page of the file now
            os.replace(staging, path)
        except OSError as error:
            if arena is None:
                os.close(descriptor)
            else:
                arena.close()
            staging.unlink(missing_ok=True)
            raise ArenaError(f"cannot create arena file {path}: {error}") from error
        return arena

    @classmethod
    def attach_file(cls, path: Path, *, writable: bool = True) -> DeviceArena:
        """Map an existing arena file; its bytes (resident experts) are kept.

        Only a regular file of this user's with no group or other permission bits is
        attached (a link is not followed), so nobody else can have planted or read it.
        ``writable=False`` maps it read-only: a process that only reads the bytes (an
        expert replica) cannot corrupt them.
        """
        path = Path(path)
        access = os.O_RDWR if writable else os.O_RDONLY
        try:
            descriptor = os.open(path, access | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as error:
            raise ArenaError(f"cannot attach arena file {path}: {error}") from error
        try:
            status = os.fstat(descriptor)
            _check_private(path, status)
            _check_capacity(status.st_size)
            fcntl.flock(descriptor, fcntl.LOCK_SH)  # from now on nobody removes it
            if not _still_named(path, status):
                raise ArenaError(f"arena file {path} was removed while being attached")
            return cls._map(path, descriptor, status.st_size, writable=writable)
        except BaseException:
            os.close(descriptor)
            raise

    @classmethod
    def open_file(cls, path: Path, capacity: int) -> DeviceArena:
        """Attach ``path`` if it already holds an arena of ``capacity`` bytes, else create it."""
        path = Path(path)
        if path.is_file() and path.stat().st_size == capacity:
            return cls.attach_file(path)
        return cls.create_file(path, capacity)

    @classmethod
    def _map(
        cls,
        path: Path,
        descriptor: int,
        capacity: int,
        populate: bool = True,
        writable: bool = True,
    ) -> DeviceArena:
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        protection = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        # Python's mmap keeps a duplicate of the descriptor it maps, and a flock lasts as
        # long as any duplicate does: map through a second open of the same file, so that
        # `close` drops the lock even while views into the mapping live on.
        access = os.O_RDWR if writable else os.O_RDONLY
        mapped = os.open(f"/proc/self/fd/{descriptor}", access | os.O_CLOEXEC)
        try:
            mapping = mmap.mmap(mapped, capacity, flags=flags, prot=protection)
        finally:
            os.close(mapped)
        # Huge pages make bulk copies faster where the kernel allows them for shared
        # memory (transparent_hugepage/shmem_enabled = advise); elsewhere a no-op.
        with contextlib.suppress(AttributeError, OSError):
            mapping.madvise(mmap.MADV_HUGEPAGE)
        host = np.frombuffer(mapping, dtype=np.uint8)
        return cls(
            "file",
            capacity,
            host=host,
            path=path,
            mapping=mapping,
            lock=descriptor,
            arena_id=str(path),  # the file outlives processes: so does its name
        )

    @classmethod
    def cuda(cls, capacity: int, device: str = "cuda") -> DeviceArena:
        """One block of GPU memory, owned by this process (the placement service) and
        mapped by others through ``share``."""
        _check_capacity(capacity)
        if not torch.cuda.is_available():
            raise ArenaError(f"a CUDA arena on {device!r} needs CUDA, which is not available")
        tensor = torch.empty(capacity, dtype=torch.uint8, device=device)
        return cls("cuda", capacity, device_tensor=tensor)

    @classmethod
    def fake_device(cls, capacity: int) -> DeviceArena:
        """A stand-in for a GPU arena: device-style (tensor views, shared by ``share``
        and ``attach``) but CPU memory, mapped only within this process."""
        _check_capacity(capacity)
        tensor, token = fake_device_tensor(capacity)
        arena = cls("fake", capacity, device_tensor=tensor, arena_id=token)
        # A uuid of its own, as a GPU has: executors find "their" device by it in tests.
        arena._share = ArenaShare(
            "fake", capacity, token, device_uuid=f"fake-{token}", handle=(token,)
        )
        return arena

    # -- sharing -----------------------------------------------------------------

    def share(self) -> ArenaShare:
        """What another process on this node needs to map this arena (see ``attach``).

        A CUDA arena is exported once: every mapping refers to the same allocation,
        which lives as long as this (the owning) process keeps the arena.
        """
        if self._share is None:
            if self.kind == "file":
                assert self.path is not None
                self._share = ArenaShare("file", self.capacity, self.arena_id, path=str(self.path))
            elif self.kind == "cuda":
                assert self._device_tensor is not None
                self._share = export_cuda(self._device_tensor, self.arena_id)
            else:
                raise ArenaError(f"a {self.kind} arena is private to its process")
        return self._share

    @classmethod
    def attach(cls, share: ArenaShare, *, writable: bool = False) -> DeviceArena:
        """Map the arena ``share`` names. A file arena is mapped read-only unless
        ``writable``; device memory cannot be made read-only, so a replica holding a
        device arena only ever makes views of it (never writes through them)."""
        if share.kind == "file":
            assert share.path is not None
            arena = cls.attach_file(Path(share.path), writable=writable)
        elif share.kind == "cuda":
            arena = cls("cuda", share.capacity, device_tensor=import_cuda(share))
        else:
            arena = cls("fake", share.capacity, device_tensor=import_fake(share))
        arena.arena_id = share.arena_id
        arena._share = share
        return arena

    # -- access ------------------------------------------------------------------

    def _check(self, region: Region) -> None:
        if region.offset < 0 or region.offset + region.nbytes > self.capacity:
            raise ArenaError(f"region {region} lies outside an arena of {self.capacity} bytes")

    def host_view(self, region: Region) -> np.ndarray:
        """The region as a uint8 numpy array (host arenas only), read-only when the arena
        was attached read-only."""
        self._check(region)
        if self._host is None:
            raise ArenaError(f"a {self.kind} arena has no host view")
        return self._host[region.offset : region.offset + region.nbytes]

    def tensor_view(self, region: Region) -> torch.Tensor:
        """The region as a uint8 torch tensor on the arena's device."""
        self._check(region)
        if self._device_tensor is not None:
            return self._device_tensor[region.offset : region.offset + region.nbytes]
        return torch.from_numpy(self.host_view(region))

    def view(self, region: Region) -> np.ndarray | torch.Tensor:
        """Host arenas: numpy; device arenas (CUDA, fake): a torch tensor."""
        if self.kind in DEVICE_KINDS:
            return self.tensor_view(region)
        return self.host_view(region)

    def read(self, region: Region) -> np.ndarray:
        """The region's bytes on the host (a copy from a CUDA arena), for comparisons."""
        if self.kind in DEVICE_KINDS:
            return self.tensor_view(region).cpu().numpy()
        return self.host_view(region)

    def close(self) -> None:
        """Drop this process's mapping and its lock; a file arena's bytes stay in the file."""
        self._host = None
        self._device_tensor = None
        if self._mapping is not None:
            # With views still alive the mapping stays until they go.
            with contextlib.suppress(BufferError):
                self._mapping.close()
            self._mapping = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _check_capacity(capacity: int) -> None:
    if capacity <= 0:
        raise ArenaError(f"arena capacity must be positive, got {capacity}")


def _still_named(path: Path, status: os.stat_result) -> bool:
    """Whether ``path`` still names the file ``status`` describes."""
    try:
        current = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (current.st_dev, current.st_ino) == (status.st_dev, status.st_ino)


def _check_room(directory: Path, capacity: int) -> None:
    """``ArenaError`` when ``directory``'s file system cannot hold ``capacity`` more bytes."""
    try:
        found = os.statvfs(directory)
    except OSError as error:
        raise ArenaError(f"cannot create an arena in {directory}: {error}") from error
    free = found.f_bavail * found.f_frsize
    if free < capacity:
        raise ArenaError(
            f"{directory} has {free / 2**20:.1f} MiB free but the arena needs "
            f"{capacity / 2**20:.1f} MiB (tiers.hbm_budget_bytes={capacity}): lower the "
            f"budget, free space there, or enlarge it (tmpfs: mount -o remount,size=...)"
        )


def _check_private(path: Path, status: os.stat_result) -> None:
    """``ArenaError`` unless ``status`` is a regular file of this user's, private to it."""
    if not stat.S_ISREG(status.st_mode):
        raise ArenaError(f"refusing arena file {path}: it is not a regular file")
    if status.st_uid != os.geteuid():
        raise ArenaError(
            f"refusing arena file {path}: it is owned by uid {status.st_uid}, "
            f"not by this user (uid {os.geteuid()})"
        )
    if status.st_mode & 0o077:
        raise ArenaError(
            f"refusing arena file {path}: its mode {stat.S_IMODE(status.st_mode):04o} lets "
            f"others in; an arena must be private to its owner (0600)"
        )
