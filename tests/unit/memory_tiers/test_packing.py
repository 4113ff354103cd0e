"""Packing a module into one buffer + index, and zero-copy views back."""

from __future__ import annotations

import pytest
import torch

from memory_tiers.packing import ALIGNMENT, TensorEntry, TensorIndex, pack_module, tensor_views


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.norm = torch.nn.LayerNorm(4).to(torch.bfloat16)
        self.register_buffer("steps", torch.arange(3, dtype=torch.int64))
        self.register_buffer("inv_freq", torch.rand(5), persistent=False)


def test_pack_stores_every_parameter_and_buffer_aligned() -> None:
    module = _Tied()
    buffer, index = pack_module(module)
    names = set(index.names())
    assert names == {
        "embed.weight",
        "head.weight",
        "norm.weight",
        "norm.bias",
        "steps",
        "inv_freq",  # non-persistent: not in a state_dict, still packed
    }
    assert all(entry.offset % ALIGNMENT == 0 for entry in index)
    assert buffer.size == index.total_bytes
    views = tensor_views(buffer, index)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        assert torch.equal(views[name], tensor.detach()), name
        assert views[name].dtype == tensor.dtype


def test_tied_tensors_are_stored_once_and_viewed_as_one_tensor() -> None:
    buffer, index = pack_module(_Tied())
    entries = {entry.name: entry for entry in index}
    assert entries["embed.weight"].offset == entries["head.weight"].offset
    views = tensor_views(buffer, index)
    assert views["embed.weight"] is views["head.weight"]
    distinct = {entry.offset for entry in index}
    assert len(distinct) == len(index.entries) - 1


def test_views_are_zero_copy_on_a_read_only_buffer() -> None:
    buffer, index = pack_module(_Tied())
    buffer.flags.writeable = False
    views = tensor_views(buffer, index)
    start = buffer.ctypes.data
    entry = next(e for e in index if e.name == "steps")
    assert views["steps"].data_ptr() == start + entry.offset
    assert views["steps"].tolist() == [0, 1, 2]


def test_views_work_on_a_region_of_a_larger_tensor() -> None:
    buffer, index = pack_module(_Tied())
    arena = torch.zeros(index.total_bytes + 4096, dtype=torch.uint8)
    region = arena[2048 : 2048 + index.total_bytes]
    region.copy_(torch.from_numpy(buffer))
    views = tensor_views(region, index)
    assert views["steps"].tolist() == [0, 1, 2]


def test_index_round_trips_through_json() -> None:
    _, index = pack_module(_Tied())
    assert TensorIndex.from_json(index.to_json()) == index


def test_index_validation_names_the_bad_tensor() -> None:
    with pytest.raises(ValueError, match=r"'w'.*nbytes 3"):
        TensorIndex((TensorEntry("w", "float32", (2,), 0, 3),), total_bytes=256)
    with pytest.raises(ValueError, match="'w' ends at 264"):
        TensorIndex((TensorEntry("w", "float32", (2,), 256, 8),), total_bytes=256)
    with pytest.raises(ValueError, match="not a version-1"):
        TensorIndex.from_json('{"version": 99}')


def test_views_refuse_a_buffer_that_is_too_small() -> None:
    buffer, index = pack_module(_Tied())
    with pytest.raises(ValueError, match="needs"):
        tensor_views(buffer[:100], index)


def test_meta_tensors_cannot_be_packed() -> None:
    with torch.device("meta"):
        module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="meta"):
        pack_module(module)
