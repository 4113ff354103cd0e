"""Truncated or corrupt safetensors files are caught from their header, before loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from actors.checkpoint import CheckpointError, check_safetensors_complete, check_weights_complete


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
