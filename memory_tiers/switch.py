"""Switch mechanics: one bulk copy into the arena, then rebinding a meta-device skeleton.

A replica builds its model skeleton ONCE from the HF config on the ``meta`` device
(no memory, no initialisation). A switch then costs one bulk copy of the expert's
packed buffer into its arena region (``copy_into``) and ``bind``, which points every
parameter and buffer at a view into that region: no file reads, no per-tensor
allocation, no module construction.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from memory_tiers.errors import BindError
from memory_tiers.packing import TensorIndex, dtype_name, tensor_views

# CUDA copies go through pinned staging buffers of this size, two of them, so the
# host memcpy into one overlaps the DMA out of the other.
STAGING_CHUNK_BYTES = 64 << 20


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


class ModelSkeleton:
    """A causal LM whose tensors live on ``meta`` until ``bind`` points them at real memory."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model: Any = model
        self.expected: dict[str, tuple[str, tuple[int, ...]]] = {}
        # (module, attribute name, is_parameter) for every name, aliases included.
        self._slots: dict[str, tuple[torch.nn.Module, str, bool]] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            prefix = f"{module_name}." if module_name else ""
            for local, param in module._parameters.items():
                if param is not None:
                    self._record(prefix + local, module, local, param, True)
            for local, buffer in module._buffers.items():
                if buffer is not None:
                    self._record(prefix + local, module, local, buffer, False)
        self.bound_generation: int | None = None

    def _record(
        self, name: str, module: torch.nn.Module, local: str, tensor: torch.Tensor, is_param: bool
    ) -> None:
        self.expected[name] = (dtype_name(tensor.dtype), tuple(tensor.shape))
        self._slots[name] = (module, local, is_param)

    @classmethod
    def from_config(cls, config: Any, dtype: str | torch.dtype = "float32") -> ModelSkeleton:
        """Build the skeleton of ``config`` (a transformers config) on the meta device."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
        return cls(model.eval())

    @classmethod
    def from_checkpoint(
        cls, directory: Path, dtype: str | torch.dtype = "float32"
    ) -> ModelSkeleton:
        """Skeleton from a checkpoint's config.json (and generation_config.json if present)."""
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(str(directory))
        skeleton = cls.from_config(config, dtype)
        if (Path(directory) / "generation_config.json").is_file():
            skeleton.model.generation_config = GenerationConfig.from_pretrained(str(directory))
        return skeleton

    def check(self, views: Mapping[str, torch.Tensor]) -> None:
        """``BindError`` naming every missing, unexpected or mismatched tensor."""
        self._check_shapes(
            {name: (dtype_name(view.dtype), tuple(view.shape)) for name, view in views.items()}
        )

    def check_index(self, index: TensorIndex) -> None:
        """``check`` against a packed expert's index, before any byte is bound."""
        self._check_shapes({entry.name: (entry.dtype, tuple(entry.shape)) for entry in index})

    def _check_shapes(self, found: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
        missing = sorted(set(self.expected) - set(found))
        unexpected = sorted(set(found) - set(self.expected))
        mismatched = []
        for name, (dtype, shape) in self.expected.items():
            seen = found.get(name)
            if seen is not None and seen != (dtype, shape):
                mismatched.append(
                    f"{name}: expected {dtype}{list(shape)}, got {seen[0]}{list(seen[1])}"
                )
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if unexpected:
            problems.append(f"unexpected {unexpected}")
        if mismatched:
            problems.append(f"mismatched {mismatched}")
        if problems:
            raise BindError("tensors do not match the model skeleton: " + "; ".join(problems))

    def bind(self, views: Mapping[str, torch.Tensor], generation: int | None = None) -> Any:
        """Point every parameter and buffer at ``views`` (no copy); returns the model.

        Tied parameters (one Parameter under several names) stay one Parameter; the
        views must agree for them. Parameters already on the views' device are kept
        and re-pointed (``param.data = view``), so a switch creates no module objects.
        Checks everything before changing anything.
        """
        self.check(views)
        wanted: dict[int, tuple[torch.nn.Parameter, torch.Tensor, str]] = {}
        for name, (module, local, is_param) in self._slots.items():
            if not is_param:
                continue
            current = module._parameters[local]
            assert current is not None
            view = views[name]
            prior = wanted.get(id(current))
            if prior is None:
                wanted[id(current)] = (current, view, name)
            elif prior[1].data_ptr() != view.data_ptr():
                raise BindError(
                    f"{name} and {prior[2]} are one tied parameter in the model but "
                    "different tensors in the views"
                )
        replaced: dict[int, torch.nn.Parameter] = {}
        for current, view, _ in wanted.values():
            if current.device == view.device and current.dtype == view.dtype:
                current.data = view
                replaced[id(current)] = current
            else:
                replaced[id(current)] = torch.nn.Parameter(view, requires_grad=False)
        for name, (module, local, is_param) in self._slots.items():
            if is_param:
                module._parameters[local] = replaced[id(module._parameters[local])]
            else:
                module._buffers[local] = views[name]
        self.bound_generation = generation
        return self.model

    def bind_buffer(
        self, buffer: np.ndarray | torch.Tensor, index: TensorIndex, generation: int | None = None
    ) -> Any:
        """``bind`` to the tensors ``index`` describes inside ``buffer``.

        Safe to call under ``torch.inference_mode``: the views are made as normal
        tensors, so the bound model also runs outside it.
        """
        with torch.inference_mode(False):
            return self.bind(tensor_views(buffer, index), generation)


def copy_into(destination: np.ndarray | torch.Tensor, source: np.ndarray) -> None:
    """One bulk copy of ``source`` (uint8) into ``destination`` (a host or CUDA region)."""
    if source.dtype != np.uint8 or source.ndim != 1:
        raise ValueError(f"source must be a 1-D uint8 array, got {source.dtype} {source.shape}")
    if isinstance(destination, np.ndarray):
        if destination.shape != source.shape or destination.dtype != np.uint8:
            raise ValueError(
                f"destination {destination.dtype}{destination.shape} does not match "
                f"source uint8{source.shape}"
            )
        np.copyto(destination, source)
        return
    if destination.dtype != torch.uint8 or tuple(destination.shape) != source.shape:
        raise ValueError(
            f"destination {destination.dtype}{tuple(destination.shape)} does not match "
            f"source uint8{source.shape}"
        )
    if destination.device.type == "cpu":
        np.copyto(destination.numpy(), source)
        return
    _copy_to_cuda(destination, source)


class _Staging:
    """Two pinned host buffers reused across copies by one process, and the lock a copy
    holds while it uses them: the placement service switches experts in on several
    threads at once, and two copies filling the same staging buffer would corrupt each
    other (they share the host -> device link anyway, so nothing is lost by waiting)."""

    buffers: ClassVar[list[torch.Tensor]] = []
    chunk_bytes: ClassVar[int] = 0
    lock: ClassVar[threading.Lock] = threading.Lock()


def _staging_buffers(chunk_bytes: int) -> list[torch.Tensor]:
    """The staging buffers (call with `_Staging.lock` held)."""
    if _Staging.chunk_bytes != chunk_bytes:
        _Staging.buffers = [
            torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)
        ]
        _Staging.chunk_bytes = chunk_bytes
    return _Staging.buffers


def _copy_to_cuda(
    destination: torch.Tensor, source: np.ndarray, chunk_bytes: int = STAGING_CHUNK_BYTES
) -> None:
    """Chunked host -> device copy through two pinned staging buffers on a side stream.

    Chunk i is memcpy'd (CPU) into staging buffer i % 2 while chunk i-1 is DMA'd out
    of the other one; before reusing a staging buffer the host waits on the event
    recorded after the DMA that last read it. The caller's stream waits on the side
    stream at the end, so work queued later sees the complete copy.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("a CUDA destination needs CUDA, which is not available")
    device = destination.device
    total = source.size
    with _Staging.lock, torch.cuda.device(device):
        staging = _staging_buffers(chunk_bytes)
        staging_numpy = [buffer.numpy() for buffer in staging]
        side = torch.cuda.Stream(device=device)
        done: list[torch.cuda.Event | None] = [None, None]
        caller = torch.cuda.current_stream(device)
        side.wait_stream(caller)  # the region may have just been freed by queued work
        for chunk, start in enumerate(range(0, total, chunk_bytes)):
            slot = chunk % 2
            length = min(chunk_bytes, total - start)
            event = done[slot]
            if event is not None:
                event.synchronize()  # the DMA that last read this staging buffer is over
            np.copyto(staging_numpy[slot][:length], source[start : start + length])
            with torch.cuda.stream(side):
                destination[start : start + length].copy_(staging[slot][:length], non_blocking=True)
                finished = torch.cuda.Event()
                finished.record(side)
            done[slot] = finished
        caller.wait_stream(side)
        side.synchronize()


def free_staging() -> None:
    """Release the pinned staging buffers (a replica that stops switching)."""
    with contextlib.suppress(Exception), _Staging.lock:
        _Staging.buffers = []
        _Staging.chunk_bytes = 0
