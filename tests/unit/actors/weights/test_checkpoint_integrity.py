"""Truncated or corrupt safetensors files are caught from their header, before loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from actors.weights.checkpoint import (
    CheckpointError,
    check_safetensors_complete,
    check_weights_complete,
)


def _weights(directory: Path) -> Path:
    path = directory / "model.safetensors"
    save_file({"a": torch.ones(64, 32), "b": torch.zeros(16)}, str(path))
    return path


def test_a_whole_file_passes(tmp_path: Path) -> None:
    _weights(tmp_path)
    check_weights_complete(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 30, -1])
def test_a_truncated_file_is_named_with_its_sizes(tmp_path: Path, keep: int) -> None:
    path = _weights(tmp_path)
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size - 1 if keep == -1 else keep)
    with pytest.raises(CheckpointError, match="truncated") as caught:
        check_safetensors_complete(path)
    assert str(path) in str(caught.value)


def test_a_corrupt_header_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes((12).to_bytes(8, "little") + b"not json at!" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="corrupt header"):
        check_weights_complete(tmp_path)


def write_small_gguf(path: Path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(50)])
    writer.add_uint32("llama.block_count", 2)
    writer.add_tensor("weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_read_into_memory_gives_the_same_fields_from_a_plain_array(tmp_path: Path) -> None:
    import gguf
    import gguf.gguf_reader
    import numpy as np

    from actors.weights.checkpoint import gguf_read_into_memory

    path = tmp_path / "small.gguf"
    write_small_gguf(path)
    mapped = gguf.GGUFReader(path)
    with gguf_read_into_memory():
        plain = gguf.GGUFReader(path)
    assert isinstance(mapped.data, np.memmap)
    assert type(plain.data) is np.ndarray  # no per-slice Python hooks
    assert gguf.gguf_reader.np is np  # put back on exit
    tokens = plain.fields["tokenizer.ggml.tokens"]
    assert [bytes(tokens.parts[i]).decode() for i in tokens.data] == [f"tok{i}" for i in range(50)]
    assert plain.fields.keys() == mapped.fields.keys()
    assert np.array_equal(plain.tensors[0].data, mapped.tensors[0].data)
    assert np.array_equal(plain.tensors[0].data.reshape(3, 4), np.arange(12).reshape(3, 4))
