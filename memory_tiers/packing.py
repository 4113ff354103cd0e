"""Pack a model's tensors into one contiguous byte buffer plus a tensor index.

The DDR tier stores each expert as one uint8 buffer: every parameter and every buffer
(persistent or not, e.g. rotary ``inv_freq``), each at an offset aligned to
``ALIGNMENT`` bytes, tied tensors stored once (their names share an offset). The
index travels beside the buffer as JSON. ``tensor_views`` turns a buffer (a read-only
array from the object store, or a region of a device arena) back into named tensors
without copying.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ALIGNMENT = 256
INDEX_VERSION = 1

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    return -(-value // alignment) * alignment


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} cannot be packed; supported: {sorted(_DTYPES)}")
    return _NAMES[dtype]


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown packed dtype {name!r}; supported: {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class TensorEntry:
    """One named tensor: where its bytes sit in the packed buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> TensorEntry:
        return TensorEntry(
            name=str(data["name"]),
            dtype=str(data["dtype"]),
            shape=tuple(int(d) for d in data["shape"]),
            offset=int(data["offset"]),
            nbytes=int(data["nbytes"]),
        )


@dataclass(frozen=True)
class TensorIndex:
    """Every tensor of one packed expert; ``total_bytes`` is the buffer length."""

    entries: tuple[TensorEntry, ...]
    total_bytes: int
    alignment: int = ALIGNMENT

    def __post_init__(self) -> None:
        names = [entry.name for entry in self.entries]
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"tensor index names repeat: {duplicates}")
        for entry in self.entries:
            expected = math.prod(entry.shape) * torch_dtype(entry.dtype).itemsize
            if entry.nbytes != expected:
                raise ValueError(
                    f"tensor {entry.name!r}: nbytes {entry.nbytes} does not match "
                    f"shape {entry.shape} x {entry.dtype} ({expected} bytes)"
                )
            if entry.offset % self.alignment or entry.offset < 0:
                raise ValueError(
                    f"tensor {entry.name!r}: offset {entry.offset} is not a non-negative "
                    f"multiple of {self.alignment}"
                )
            if entry.offset + entry.nbytes > self.total_bytes:
                raise ValueError(
                    f"tensor {entry.name!r} ends at {entry.offset + entry.nbytes}, past the "
                    f"buffer's {self.total_bytes} bytes"
                )

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.entries)

    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": INDEX_VERSION,
                "alignment": self.alignment,
                "total_bytes": self.total_bytes,
                "tensors": [entry.to_json() for entry in self.entries],
            }
        )

    @staticmethod
    def from_json(text: str) -> TensorIndex:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
            raise ValueError(f"not a version-{INDEX_VERSION} tensor index: {text[:80]!r}")
        return TensorIndex(
            entries=tuple(TensorEntry.from_json(item) for item in data["tensors"]),
            total_bytes=int(data["total_bytes"]),
            alignment=int(data["alignment"]),
        )


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer, aliases included (tied weights appear under each name)."""
    found: list[tuple[str, torch.Tensor]] = []
    found.extend(module.named_parameters(remove_duplicate=False))
    found.extend(module.named_buffers(remove_duplicate=False))
    return found


def _alias_key(tensor: torch.Tensor) -> tuple[object, ...]:
    # Same storage, same place, same layout = the same tensor (tied weights).
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def pack_module(module: torch.nn.Module) -> tuple[np.ndarray, TensorIndex]:
    """Pack every parameter and buffer of ``module`` into one buffer (one copy per tensor)."""
    named = _named_tensors(module)
    entries: list[TensorEntry] = []
    sources: list[tuple[int, torch.Tensor]] = []
    offsets: dict[tuple[object, ...], int] = {}
    cursor = 0
    for name, tensor in named:
        if tensor.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device; it has no data to pack")
        nbytes = tensor.numel() * tensor.element_size()
        key = _alias_key(tensor) if nbytes else (name,)
        offset = offsets.get(key)
        if offset is None:
            offset = cursor
            offsets[key] = offset
            sources.append((offset, tensor))
            cursor = align_up(offset + nbytes)
        entries.append(
            TensorEntry(name, dtype_name(tensor.dtype), tuple(tensor.shape), offset, nbytes)
        )
    index = TensorIndex(entries=tuple(entries), total_bytes=cursor)
    buffer = np.zeros(cursor, dtype=np.uint8)  # padding bytes are zero, not leftovers
    flat = torch.from_numpy(buffer)
    with torch.no_grad():
        for offset, tensor in sources:
            nbytes = tensor.numel() * tensor.element_size()
            target = flat[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            target.copy_(tensor.detach())
    return buffer, index


def _as_flat_tensor(buffer: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(buffer, torch.Tensor):
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError(
                f"buffer must be a 1-D uint8 tensor, got {buffer.dtype} {buffer.shape}"
            )
        return buffer
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise ValueError(f"buffer must be a 1-D uint8 array, got {buffer.dtype} {buffer.shape}")
    with warnings.catch_warnings():
        # Object-store buffers are read-only; the views are only ever read.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(buffer)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides: list[int] = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _view(
    flat: torch.Tensor, typed: dict[torch.dtype, torch.Tensor | None], entry: TensorEntry
) -> torch.Tensor:
    """One tensor of ``flat``: a single ``as_strided`` on a per-dtype view of the buffer
    (a switch builds hundreds of these), else slice-and-view when the buffer's start is
    not aligned to the dtype."""
    dtype = torch_dtype(entry.dtype)
    if dtype not in typed:
        usable = flat.numel() - flat.numel() % dtype.itemsize
        try:
            typed[dtype] = flat[:usable].view(dtype)
        except RuntimeError:
            typed[dtype] = None
    whole = typed[dtype]
    if whole is None:
        return flat[entry.offset : entry.offset + entry.nbytes].view(dtype).view(entry.shape)
    start = whole.storage_offset() + entry.offset // dtype.itemsize
    return whole.as_strided(entry.shape, _contiguous_strides(entry.shape), start)


def tensor_views(buffer: np.ndarray | torch.Tensor, index: TensorIndex) -> dict[str, torch.Tensor]:
    """Named tensors viewing ``buffer`` (no copy); tied names map to the same tensor object.

    ``buffer`` is a 1-D uint8 numpy array (possibly read-only: do not write through the
    views then) or a 1-D uint8 torch tensor on any device.
    """
    flat = _as_flat_tensor(buffer)
    if flat.numel() < index.total_bytes:
        raise ValueError(
            f"buffer holds {flat.numel()} bytes but the index needs {index.total_bytes}"
        )
    by_place: dict[tuple[int, str, tuple[int, ...]], torch.Tensor] = {}
    typed: dict[torch.dtype, torch.Tensor | None] = {}
    views: dict[str, torch.Tensor] = {}
    for entry in index:
        place = (entry.offset, entry.dtype, entry.shape)
        view = by_place.get(place)
        if view is None:
            view = _view(flat, typed, entry)
            by_place[place] = view
        views[entry.name] = view
    return views


def checkpoint_nbytes(directory: Path, dtype: str | None = None) -> int:
    """Bytes of tensor data in a safetensors checkpoint, read from the file headers only.

    With `dtype` (e.g. "float32"), the bytes the tensors take once cast to it, as
    an expert served at that dtype packs them. A lower bound of the packed size
    (which adds alignment and non-persistent buffers), cheap enough to check a
    device budget against before anything loads.
    """
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} has no *.safetensors files")
    itemsize = None if dtype is None else torch_dtype(dtype).itemsize
    total = 0
    for file in files:
        with file.open("rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            if not 0 < header_length <= 100 << 20:
                raise ValueError(f"{file} is not a safetensors file (header {header_length} bytes)")
            header = json.loads(handle.read(header_length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if itemsize is None:
                start, end = info["data_offsets"]
                total += int(end) - int(start)
            else:
                total += math.prod(int(size) for size in info["shape"]) * itemsize
    return total
