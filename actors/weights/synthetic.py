"""Small Llama-shaped checkpoints with distinct random weights.

Tests and benchmarks need many experts whose answers differ (so an answer from the
wrong weights is caught) at a size many of them fit on this machine. Each checkpoint
is a real transformers model saved in safetensors with a real tokenizer copied from
an existing checkpoint, so it loads and serves exactly like any other expert.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from actors.weights.checkpoint import validate_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class TinyShape:
    """Dimensions of one synthetic expert; the vocabulary comes from the tokenizer."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 128


def build_tiny_expert(
    output_dir: Path, seed: int, tokenizer_dir: Path, shape: TinyShape | None = None
) -> Path:
    """Write a random-init Llama checkpoint (seeded) with `tokenizer_dir`'s tokenizer.

    Idempotent: an existing valid checkpoint directory is returned as it is.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if output_dir.is_dir() and (output_dir / "model.safetensors").is_file():
        validate_checkpoint(output_dir)
        return output_dir
    shape = shape or TinyShape()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, staging / name)
    shutil.rmtree(output_dir, ignore_errors=True)
    staging.rename(output_dir)
    validate_checkpoint(output_dir)
    return output_dir
