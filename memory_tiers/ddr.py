"""The DDR tier: every expert's packed buffer in an object store, rebuilt from disk if lost.

The object store is reached only through the ``ObjectStore`` protocol (the cluster
package implements it over the Ray object store; ``InProcessObjectStore`` serves unit
tests and single-process use). The checkpoint on disk stays the source of truth:
each registered expert has an ``ExpertSource`` that can rebuild its packed buffer,
and ``DDRStore.get`` does so transparently when the store reports ``ObjectLost``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from memory_tiers.errors import ObjectLost, UnknownExpert
from memory_tiers.packing import TensorIndex, pack_module

Packed = tuple[np.ndarray, TensorIndex]


class ObjectStore(Protocol):
    """Holds immutable byte buffers; ``get`` returns a read-only, zero-copy array."""

    def put(self, array: np.ndarray) -> Any: ...

    def get(self, ref: Any) -> np.ndarray:
        """Raises ``ObjectLost`` when the object is gone."""
        ...

    def free(self, ref: Any) -> None: ...

    def spilled(self, ref: Any) -> bool:
        """Whether the object now lives only on disk (spilled when the store was full):
        the next ``get`` restores it, at disk speed. The fourth tier, below DDR."""
        ...


@dataclass(frozen=True)
class InProcessRef:
    object_id: int


class InProcessObjectStore:
    """An object store inside this process: a dict of read-only arrays.

    ``lose`` drops an object as the real store would on eviction or node death;
    ``spill`` marks one as spilled to disk, which its next ``get`` restores.
    """

    def __init__(self) -> None:
        self._objects: dict[int, np.ndarray] = {}
        self._spilled: set[int] = set()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def put(self, array: np.ndarray) -> InProcessRef:
        stored = array.view()
        stored.flags.writeable = False
        with self._lock:
            ref = InProcessRef(next(self._ids))
            self._objects[ref.object_id] = stored
        return ref

    def get(self, ref: Any) -> np.ndarray:
        if not isinstance(ref, InProcessRef):
            raise TypeError(f"not a reference of this store: {ref!r}")
        with self._lock:
            stored = self._objects.get(ref.object_id)
            self._spilled.discard(ref.object_id)
        if stored is None:
            raise ObjectLost(f"object {ref.object_id} is not in the in-process store")
        return stored

    def spilled(self, ref: Any) -> bool:
        return isinstance(ref, InProcessRef) and ref.object_id in self._spilled

    def spill(self, ref: InProcessRef) -> None:
        with self._lock:
            if ref.object_id in self._objects:
                self._spilled.add(ref.object_id)

    def free(self, ref: Any) -> None:
        if isinstance(ref, InProcessRef):
            with self._lock:
                self._objects.pop(ref.object_id, None)

    def lose(self, ref: InProcessRef) -> None:
        self.free(ref)

    def __len__(self) -> int:
        return len(self._objects)


class ExpertSource(Protocol):
    """Knows how to (re)build one expert's packed buffer from the source of truth."""

    def build(self) -> Packed: ...

    def describe(self) -> str: ...


class CheckpointSource:
    """Packs a safetensors checkpoint directory through transformers' own loader.

    Loading the module (rather than reading the files) also captures non-persistent
    buffers such as rotary ``inv_freq``, which a checkpoint does not store.
    """

    def __init__(self, directory: Path, dtype: str = "float32") -> None:
        self.directory = Path(directory)
        self.dtype = dtype

    def build(self) -> Packed:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, self.dtype)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        model = AutoModelForCausalLM.from_pretrained(
            str(self.directory), dtype=dtype, use_safetensors=True
        )
        return pack_module(model.eval())

    def describe(self) -> str:
        return expert_source(self.directory, self.dtype)


PLAIN_LAYOUT = "plain"


def expert_source(directory: Path, dtype: str, layout: str = PLAIN_LAYOUT) -> str:
    """How a checkpoint source describes itself: what the placement service and a replica
    compare to agree on whose bytes a grant carries. `layout`: the tensors as the
    checkpoint's model has them ("plain"), or as a transformed module does (DeepSpeed's
    kernel injection packs its fused tensors)."""
    if layout == PLAIN_LAYOUT:
        return f"checkpoint {directory} ({dtype})"
    return f"checkpoint {directory} ({dtype}, {layout} layout)"


class CallableSource:
    """A source given as a function (tests, synthetic experts)."""

    def __init__(self, build: Callable[[], Packed], description: str = "callable") -> None:
        self._build = build
        self._description = description

    def build(self) -> Packed:
        return self._build()

    def describe(self) -> str:
        return self._description


@dataclass
class DDREntry:
    expert: str
    source: ExpertSource
    ref: Any
    index: TensorIndex

    @property
    def nbytes(self) -> int:
        return self.index.total_bytes


class DDRStore:
    """One object per expert in an ``ObjectStore``; rebuilds lost objects from their source."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._entries: dict[str, DDREntry] = {}
        self._lock = threading.Lock()
        self._rebuild_locks: dict[str, threading.Lock] = {}
        self.rebuilds = 0
        self.rebuild_seconds = 0.0
        self.restores = 0  # gets that brought a spilled object back from disk
        self.restore_seconds = 0.0

    def register(self, expert: str, source: ExpertSource, packed: Packed | None = None) -> DDREntry:
        """Pack (unless ``packed`` is given) and store ``expert``; replaces an older entry."""
        buffer, index = packed if packed is not None else source.build()
        _check_packed(expert, buffer, index)
        ref = self.store.put(buffer)
        entry = DDREntry(expert, source, ref, index)
        with self._lock:
            previous = self._entries.get(expert)
            self._entries[expert] = entry
            self._rebuild_locks.setdefault(expert, threading.Lock())
        if previous is not None:
            self.store.free(previous.ref)
        return entry

    def unregister(self, expert: str) -> None:
        with self._lock:
            entry = self._entries.pop(self._known(expert))
        self.store.free(entry.ref)

    def _known(self, expert: str) -> str:
        if expert not in self._entries:
            raise UnknownExpert(
                f"expert {expert!r} is not registered in DDR; known: {self.experts()}"
            )
        return expert

    def entry(self, expert: str) -> DDREntry:
        with self._lock:
            return self._entries[self._known(expert)]

    def experts(self) -> list[str]:
        return sorted(self._entries)

    def index(self, expert: str) -> TensorIndex:
        return self.entry(expert).index

    def nbytes(self, expert: str) -> int:
        return self.entry(expert).nbytes

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {name: entry.nbytes for name, entry in self._entries.items()}

    def get(self, expert: str) -> Packed:
        """The expert's read-only buffer and index; rebuilt from its source if lost."""
        buffer, index, _ = self.fetch(expert)
        return buffer, index

    def fetch(self, expert: str) -> tuple[np.ndarray, TensorIndex, bool]:
        """``get``, and whether the buffer had to be restored from disk (spilled)."""
        entry = self.entry(expert)
        spilled = self.store.spilled(entry.ref)
        started = time.perf_counter()
        try:
            buffer = self.store.get(entry.ref)
        except ObjectLost:
            return (*self._get_lost(expert, entry), False)
        if spilled:
            with self._lock:
                self.restores += 1
                self.restore_seconds += time.perf_counter() - started
        return buffer, entry.index, spilled

    def _get_lost(self, expert: str, entry: DDREntry) -> Packed:
        with self._rebuild_locks[expert]:
            # Another thread may have rebuilt it while this one waited.
            current = self.entry(expert)
            if current.ref is not entry.ref:
                try:
                    return self.store.get(current.ref), current.index
                except ObjectLost:
                    pass
            return self._rebuild(current)

    def _rebuild(self, entry: DDREntry) -> Packed:
        started = time.perf_counter()
        buffer, index = entry.source.build()
        _check_packed(entry.expert, buffer, index)
        if index.to_json() != entry.index.to_json():
            raise ObjectLost(
                f"expert {entry.expert!r} was lost and {entry.source.describe()} now packs "
                f"differently ({index.total_bytes} bytes vs {entry.index.total_bytes}); "
                "the checkpoint changed on disk"
            )
        ref = self.store.put(buffer)
        with self._lock:
            self._entries[entry.expert] = DDREntry(entry.expert, entry.source, ref, index)
            self.rebuilds += 1
            self.rebuild_seconds += time.perf_counter() - started
        return self.store.get(ref), index

    def metrics(self) -> dict[str, float]:
        with self._lock:
            return {
                "experts": float(len(self._entries)),
                "bytes": float(sum(e.nbytes for e in self._entries.values())),
                "rebuilds": float(self.rebuilds),
                "rebuild_seconds": self.rebuild_seconds,
                "restores": float(self.restores),
                "restore_seconds": self.restore_seconds,
            }


def _check_packed(expert: str, buffer: np.ndarray, index: TensorIndex) -> None:
    if buffer.dtype != np.uint8 or buffer.ndim != 1 or buffer.size != index.total_bytes:
        raise ValueError(
            f"expert {expert!r}: packed buffer is {buffer.dtype} {buffer.shape}, expected "
            f"uint8 ({index.total_bytes},)"
        )
