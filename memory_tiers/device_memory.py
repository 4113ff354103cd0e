"""Device memory one process allocates and others on its node map: a GPU's arena.

The placement service allocates one arena per GPU and copies experts into it; the
executors on that GPU map the same memory and only rebind views into it. On CUDA the
memory travels as an IPC handle (torch's own, the one `torch.multiprocessing` sends);
the receiving process must see the same physical GPU, found by its UUID, whatever
index its CUDA_VISIBLE_DEVICES gives it.

A "fake" device stands in for a GPU where there is none: a torch CPU tensor handed
out by token within one process, so that the bookkeeping of two executors on one
device (the bytes they read are the bytes the placement service copied) is tested on
a CPU through the same `ArenaShare` interface.
"""

from __future__ import annotations

import secrets
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from memory_tiers.errors import ArenaError

ShareKind = Literal["file", "cuda", "fake"]


@dataclass(frozen=True)
class ArenaShare:
    """How another process on the node maps an arena (picklable; sent by Ray).

    ``arena_id`` is new for every arena allocated, so a replica tells a restarted
    placement service's arena (new memory) from the one it mapped before.
    """

    kind: ShareKind
    capacity: int
    arena_id: str
    path: str | None = None  # file: the arena file
    device_uuid: str | None = None  # cuda: the physical GPU holding the memory
    handle: tuple[Any, ...] | None = field(default=None, repr=False)  # cuda / fake


def new_arena_id() -> str:
    return secrets.token_hex(8)


# -- CUDA ------------------------------------------------------------------------------


def gpu_uuid(device: torch.device) -> str:
    """The physical identity of a CUDA device (stable across CUDA_VISIBLE_DEVICES)."""
    return str(torch.cuda.get_device_properties(device).uuid)


def export_cuda(tensor: torch.Tensor, arena_id: str) -> ArenaShare:
    """An IPC handle for ``tensor``'s memory; the exporter must keep ``tensor`` alive."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, arguments = reduce_tensor(tensor)
    return ArenaShare(
        "cuda",
        tensor.numel(),
        arena_id,
        device_uuid=gpu_uuid(tensor.device),
        handle=tuple(arguments),
    )


# Position of `storage_device` in rebuild_cuda_tensor's arguments (torch 2.x).
_STORAGE_DEVICE_ARG = 6


def import_cuda(share: ArenaShare) -> torch.Tensor:
    """Map a CUDA arena another process exported. ``ArenaError`` when this process
    does not see its GPU (Ray gave the executor another GPU than the arena's)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if share.handle is None or share.device_uuid is None:
        raise ArenaError("a CUDA arena share needs its IPC handle and GPU uuid")
    if not torch.cuda.is_available():
        raise ArenaError(f"the arena is on GPU {share.device_uuid}, but CUDA is not available")
    local = local_index(share.device_uuid)
    arguments = list(share.handle)
    arguments[_STORAGE_DEVICE_ARG] = local  # the exporter's index means nothing here
    with torch.cuda.device(local):
        tensor = rebuild_cuda_tensor(*arguments)
    return tensor


def local_index(device_uuid: str) -> int:
    """This process's index of the GPU ``device_uuid``; ``ArenaError`` if it is unseen."""
    seen = [gpu_uuid(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    if device_uuid not in seen:
        raise ArenaError(
            f"the arena is on GPU {device_uuid}, which this process does not see (it "
            f"sees {seen}): the placement service and its executors must share a GPU"
        )
    return seen.index(device_uuid)


# -- fake device -----------------------------------------------------------------------

_fake_lock = threading.Lock()
_fake_arenas: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()


def fake_device_tensor(capacity: int) -> tuple[torch.Tensor, str]:
    """A "device" block (a CPU tensor) and the token that maps it in this process."""
    tensor = torch.zeros(capacity, dtype=torch.uint8)
    token = new_arena_id()
    with _fake_lock:
        _fake_arenas[token] = tensor
    return tensor, token


def import_fake(share: ArenaShare) -> torch.Tensor:
    """The fake device block a share names; ``ArenaError`` once its owner freed it
    (as a CUDA import fails once the exporting process is gone)."""
    token = share.handle[0] if share.handle else None
    with _fake_lock:
        tensor = _fake_arenas.get(str(token))
    if tensor is None:
        raise ArenaError(f"fake device arena {share.arena_id} is gone")
    return tensor
