"""Pack-time kernel injection, with a fake injector standing in for DeepSpeed's (whose
fused ops need a GPU): the expert is packed in the injected layout, the skeleton is the
injected module, and a switch rebinds the fused tensors without injection ever running
on arena bytes. Which architectures DeepSpeed can inject is a table with reasons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig

from actors.engines.deepspeed_engine import kernel_injection_supported
from actors.engines.kernel_injection import (
    PREPARED_MARK,
    injected_packed,
    injected_skeleton,
    injection_refusal,
)

TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


class FusedMLP(torch.nn.Module):
    """What injection does to a layer's MLP, in miniature: gate and up concatenated into
    one tensor, down transposed; a new module with new tensor names and shapes."""

    def __init__(self, mlp: Any) -> None:
        super().__init__()
        with torch.no_grad():
            fused = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            down_t = mlp.down_proj.weight.t().contiguous()
        self.gate_up = torch.nn.Parameter(fused, requires_grad=False)
        self.down_t = torch.nn.Parameter(down_t, requires_grad=False)
        self.act = mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up.t()).chunk(2, dim=-1)
        return (self.act(gate) * up) @ self.down_t


def fake_inject(model: Any, dtype: torch.dtype) -> Any:
    for layer in model.model.layers:
        layer.mlp = FusedMLP(layer.mlp)
    setattr(model, PREPARED_MARK, True)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    return directory


def _logits(model: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(TOKENS).logits


def test_the_expert_is_packed_in_the_injected_layout(checkpoint: Path) -> None:
    _, index = injected_packed(checkpoint, "float32", fake_inject)
    names = {entry.name for entry in index}
    assert "model.layers.0.mlp.gate_up" in names
    assert not any("gate_proj" in name or "up_proj" in name for name in names)


def test_a_switch_rebinds_the_injected_tensors_and_never_writes_the_arena(
    checkpoint: Path,
) -> None:
    buffer, index = injected_packed(checkpoint, "float32", fake_inject)
    buffer.setflags(write=False)  # as replicas map the arena: read-only
    before = buffer.copy()
    skeleton = injected_skeleton(checkpoint, "float32", fake_inject)
    assert getattr(skeleton.model, PREPARED_MARK) is True  # the engine will not inject again
    skeleton.check_index(index)
    model = skeleton.bind_buffer(buffer, index)
    plain = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    torch.testing.assert_close(_logits(model), _logits(plain), rtol=1e-5, atol=1e-5)
    assert (buffer == before).all()
    # A second expert of the same architecture: the same skeleton rebinds to its bytes.
    other = fake_inject(AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval(), torch.float32)
    with torch.no_grad():
        other.model.layers[1].mlp.gate_up.mul_(0.5)
    from memory_tiers.packing import pack_module

    other_buffer, other_index = pack_module(other)
    torch.testing.assert_close(
        _logits(skeleton.bind_buffer(other_buffer, other_index)), _logits(other)
    )


def test_which_architectures_deepspeed_can_inject_and_why_not() -> None:
    smollm2 = LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert "DeepSpeed#7282" in str(injection_refusal(smollm2))
    assert "9 query heads, 3 key/value heads" in str(injection_refusal(smollm2))
    full_heads = LlamaConfig(num_attention_heads=4, num_key_value_heads=4, hidden_size=32)
    assert "transformers 5" in str(injection_refusal(full_heads))
    gemma = Gemma3TextConfig()
    assert "no kernel-injection policy for 'gemma3_text'" in str(injection_refusal(gemma))
    assert injection_refusal(GPT2Config()) is None
    assert kernel_injection_supported(GPT2Config(), cuda=True)
    assert not kernel_injection_supported(GPT2Config(), cuda=False)
    assert not kernel_injection_supported(smollm2, cuda=True)


def test_deepspeed_injection_without_cuda_is_refused_by_name(checkpoint: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA"):
        injected_packed(checkpoint, "float32")
