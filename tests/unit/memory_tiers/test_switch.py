"""Switch mechanics: a meta skeleton rebound to arena views answers like from_pretrained."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from memory_tiers.arena import DeviceArena, Region
from memory_tiers.ddr import CheckpointSource
from memory_tiers.errors import BindError
from memory_tiers.packing import pack_module, tensor_views
from memory_tiers.switch import ModelSkeleton, copy_into

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 3]])


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny matmuls are fastest on one thread, and a shared machine cannot spin two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_config(tied: bool = True) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )


def _save_tiny(directory: Path, seed: int, tied: bool = True) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(tied))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)  # large weights: varied, seed-specific tokens
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def _answers(model: Any, new_tokens: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        logits = model(PROMPT).logits
        tokens = model.generate(PROMPT, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return logits, tokens


@pytest.mark.parametrize("tied", [True, False])
def test_bound_skeleton_generates_exactly_what_from_pretrained_does(
    tmp_path: Path, tied: bool
) -> None:
    directory = _save_tiny(tmp_path / "tiny", seed=3, tied=tied)
    reference = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    buffer, index = CheckpointSource(directory).build()
    arena = DeviceArena.in_memory(index.total_bytes + 4096)
    region = Region(1024, index.total_bytes)
    copy_into(arena.host_view(region), buffer)
    skeleton = ModelSkeleton.from_checkpoint(directory)
    model = skeleton.bind_buffer(arena.host_view(region), index, generation=1)
    expected_logits, expected_tokens = _answers(reference, new_tokens=4)
    logits, tokens = _answers(model, new_tokens=4)
    assert torch.equal(logits, expected_logits)
    assert torch.equal(tokens, expected_tokens)
    assert skeleton.bound_generation == 1
    start = arena.host_view(region).ctypes.data
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert start <= tensor.data_ptr() < start + index.total_bytes, name
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_rebinding_switches_experts_without_rebuilding_the_module(tmp_path: Path) -> None:
    first = pack_module(AutoModelForCausalLM.from_pretrained(str(_save_tiny(tmp_path / "a", 1))))
    second = pack_module(AutoModelForCausalLM.from_pretrained(str(_save_tiny(tmp_path / "b", 2))))
    skeleton = ModelSkeleton.from_config(_tiny_config())
    module_before = skeleton.model
    region = np.empty(first[1].total_bytes, dtype=np.uint8)
    copy_into(region, first[0])
    a_logits, _ = _answers(skeleton.bind_buffer(region, first[1]))
    copy_into(region, second[0])
    b_logits, _ = _answers(skeleton.bind_buffer(region, second[1]))
    assert skeleton.model is module_before
    assert not torch.equal(a_logits, b_logits)
    copy_into(region, first[0])
    again, _ = _answers(skeleton.bind_buffer(region, first[1]))
    assert torch.equal(again, a_logits)


def test_bind_names_missing_and_mismatched_tensors_and_changes_nothing() -> None:
    skeleton = ModelSkeleton.from_config(_tiny_config())
    torch.manual_seed(0)
    buffer, index = pack_module(AutoModelForCausalLM.from_config(_tiny_config()))
    views = dict(tensor_views(buffer, index))
    del views["model.norm.weight"]
    views["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    views["extra.weight"] = torch.zeros(1)
    with pytest.raises(BindError) as caught:
        skeleton.bind(views)
    message = str(caught.value)
    assert "missing ['model.norm.weight']" in message
    assert "unexpected ['extra.weight']" in message
    assert "model.layers.0.mlp.up_proj.weight: expected float32[128, 64]" in message
    assert skeleton.model.model.norm.weight.device.type == "meta"


def test_the_skeleton_holds_no_memory_until_bound() -> None:
    skeleton = ModelSkeleton.from_config(_tiny_config(), dtype="bfloat16")
    tensors = [*skeleton.model.parameters(), *skeleton.model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert skeleton.expected["model.embed_tokens.weight"] == ("bfloat16", (256, 64))


def test_copy_into_checks_shapes() -> None:
    with pytest.raises(ValueError, match="does not match"):
        copy_into(np.empty(10, dtype=np.uint8), np.zeros(11, dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        copy_into(np.empty(10, dtype=np.uint8), np.zeros(10, dtype=np.float32))
    target = torch.empty(4, dtype=torch.uint8)
    copy_into(target, np.arange(4, dtype=np.uint8))
    assert target.tolist() == [0, 1, 2, 3]


def _demo_checkpoint() -> Path:
    cache = Path(os.environ.get("COE_CACHE_DIR") or Path.home() / ".cache" / "coe")
    directory = cache / "smollm2-135m-instruct"
    if not (directory / "model.safetensors").is_file():
        pytest.skip(f"demo checkpoint not built at {directory} (run `coe demo build`)")
    return directory


def test_smollm2_bound_from_the_arena_matches_from_pretrained() -> None:
    directory = _demo_checkpoint()
    reference = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    buffer, index = pack_module(reference)
    arena = DeviceArena.in_memory(index.total_bytes)
    region = Region(0, index.total_bytes)
    copy_into(arena.host_view(region), buffer)
    del buffer
    model = ModelSkeleton.from_checkpoint(directory).bind_buffer(arena.host_view(region), index)
    expected_logits, expected_tokens = _answers(reference, new_tokens=4)
    logits, tokens = _answers(model, new_tokens=4)
    assert torch.equal(logits, expected_logits)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copies_through_double_buffered_staging_are_exact() -> None:
    from memory_tiers.switch import _copy_to_cuda

    source = np.random.default_rng(0).integers(0, 256, size=(5 << 20) + 123, dtype=np.uint8)
    destination = torch.zeros(source.size, dtype=torch.uint8, device="cuda")
    _copy_to_cuda(destination, source, chunk_bytes=1 << 20)  # six chunks, two buffers
    assert np.array_equal(destination.cpu().numpy(), source)
    copy_into(destination, np.zeros_like(source))
    assert int(destination.sum()) == 0


def test_rebinding_keeps_parameter_objects_and_tied_views_must_agree() -> None:
    skeleton = ModelSkeleton.from_config(_tiny_config(tied=True))
    torch.manual_seed(0)
    buffer, index = pack_module(AutoModelForCausalLM.from_config(_tiny_config(tied=True)))
    model = skeleton.bind_buffer(buffer.copy(), index)
    first = {name: id(p) for name, p in model.named_parameters()}
    model = skeleton.bind_buffer(buffer.copy(), index)
    assert {name: id(p) for name, p in model.named_parameters()} == first
    views = dict(tensor_views(buffer, index))
    views["lm_head.weight"] = views["model.embed_tokens.weight"].clone()
    with pytest.raises(BindError, match="tied"):
        skeleton.bind(views)


def test_a_model_bound_under_inference_mode_also_runs_outside_it() -> None:
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(_tiny_config()).eval()
    buffer, index = pack_module(reference)
    skeleton = ModelSkeleton.from_config(_tiny_config())
    with torch.inference_mode():
        skeleton.bind_buffer(buffer.copy(), index)
        skeleton.bind_buffer(buffer.copy(), index)
    with torch.no_grad():
        assert torch.equal(skeleton.model(PROMPT).logits, reference(PROMPT).logits)


def test_checkpoint_nbytes_reads_headers_and_bounds_the_packed_size(tmp_path: Path) -> None:
    from memory_tiers.packing import checkpoint_nbytes

    directory = _save_tiny(tmp_path / "tiny", seed=0, tied=False)
    _, index = CheckpointSource(directory).build()
    on_disk = checkpoint_nbytes(directory)
    assert 0 < on_disk <= index.total_bytes
    assert index.total_bytes - on_disk < 256 * len(index.entries) + 4096  # alignment, buffers
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        checkpoint_nbytes(tmp_path / "bad")


def test_a_skeleton_bound_to_a_read_only_arena_generates_the_same_tokens(tmp_path: Path) -> None:
    """Expert replicas map the shared arena read-only: generation only reads weights."""
    directory = _save_tiny(tmp_path / "tiny", seed=5)
    reference = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    buffer, index = CheckpointSource(directory).build()
    path = tmp_path / "arena.bin"
    writer = DeviceArena.create_file(path, index.total_bytes + 4096)
    region = Region(4096, index.total_bytes)
    copy_into(writer.host_view(region), buffer)
    reader = DeviceArena.attach_file(path, writable=False)
    view = reader.host_view(region)
    assert not view.flags.writeable
    model = ModelSkeleton.from_checkpoint(directory).bind_buffer(view, index, generation=1)
    expected_logits, expected_tokens = _answers(reference, new_tokens=4)
    logits, tokens = _answers(model, new_tokens=4)
    assert torch.equal(logits, expected_logits)
    assert torch.equal(tokens, expected_tokens)
