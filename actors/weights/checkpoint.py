"""Checkpoint directories: validation and the one-time GGUF -> safetensors conversion.

Serving only ever reads Hugging Face checkpoint directories in safetensors. GGUF
files are dequantised once by transformers' own loader and written out here, so the
serving path never pays for dequantisation and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SOURCE_MARKER = "coe-source.json"
Progress = Callable[[str], None]


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be served; the message says why."""


def validate_checkpoint(directory: Path) -> None:
    """Raise `CheckpointError` unless `directory` is a safetensors HF checkpoint."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json")
    if not any(directory.glob("*.safetensors")):
        raise CheckpointError(f"{directory} has no *.safetensors weights")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(f"{directory} has no tokenizer (tokenizer.json or tokenizer.model)")


def check_weights_complete(directory: Path) -> None:
    """`check_safetensors_complete` for every weights file of a checkpoint directory."""
    for weights in sorted(directory.glob("*.safetensors")):
        check_safetensors_complete(weights)


def check_safetensors_complete(path: Path) -> None:
    """Raise `CheckpointError` when a safetensors file is cut short or its header is bad.

    Reads only the header (its length, then JSON naming every tensor's byte range), so
    a truncated copy is caught before any replica tries to load it.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, not even a header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is truncated or corrupt: its header claims {header_len} bytes, "
                f"the file has {size}"
            )
        try:
            header = json.loads(handle.read(header_len))
            ends = [
                int(entry["data_offsets"][1])
                for name, entry in header.items()
                if name != "__metadata__"
            ]
        except (ValueError, TypeError, KeyError, IndexError) as error:
            raise CheckpointError(f"{path} has a corrupt header: {error}") from None
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes, but its header describes {expected}"
        )


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def read_source_marker(directory: Path) -> dict[str, str] | None:
    marker = directory / SOURCE_MARKER
    if not marker.is_file():
        return None
    data = json.loads(marker.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


@contextmanager
def gguf_read_into_memory() -> Iterator[None]:
    """While active, gguf's reader reads a file into one plain array instead of mapping it.

    The reader slices its np.memmap once per metadata value, and a memmap's Python-level
    __getitem__ and __array_finalize__ run on every slice: for a 262k-token vocabulary
    that is millions of calls, most of a conversion's time. A plain array holds the
    same bytes (the whole file in memory: a few hundred MB for the demo models).
    """
    import numpy as np

    try:
        import gguf.gguf_reader as reader
    except ImportError:  # transformers then fails with its own message
        yield
        return
    mapped = reader.np
    plain = types.SimpleNamespace(**vars(mapped))
    plain.memmap = lambda path, mode="r": np.fromfile(path, dtype=np.uint8)
    reader.np = plain  # type: ignore[assignment]  # a stand-in for the numpy module
    try:
        yield
    finally:
        reader.np = mapped


def convert_gguf(gguf_path: Path, output_dir: Path, sha256: str, progress: Progress) -> Path:
    """Dequantise a GGUF file once into a safetensors checkpoint directory.

    Writes into a sibling temporary directory and renames it into place, so an
    interrupted conversion never leaves a half-written checkpoint behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    progress(f"dequantising {gguf_path.name} (transformers' GGUF loader)")
    with gguf_read_into_memory():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    progress(f"dequantised in {time.monotonic() - started:.1f}s; writing safetensors")
    # The GGUF quantiser marks the model as quantised, which blocks saving; the
    # weights are plain float tensors by now, so the marker is dropped.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (the attribute is typed non-optional)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    marker = {"gguf": gguf_path.name, "sha256": sha256, "architecture": type(model).__name__}
    (staging / SOURCE_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    validate_checkpoint(staging)
    shutil.rmtree(output_dir, ignore_errors=True)
    staging.rename(output_dir)
    progress(f"wrote {output_dir} in {time.monotonic() - started:.1f}s")
    return output_dir
