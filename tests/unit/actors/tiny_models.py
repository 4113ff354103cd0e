"""Tiny real checkpoints for unit tests: a word-level tokenizer and seeded Llama weights.

Real transformers models and a real (fast) tokenizer, small enough to build in
milliseconds, with weights large enough that two seeds answer differently.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(250)]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}<|system|> {% else %}<|user|> "
    "{% endif %}{{ m['content'] }} {% endfor %}"
)


def save_tokenizer(directory: Path) -> None:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(str(directory))


def save_tiny_expert(directory: Path, seed: int, hidden: int = 64) -> Path:
    """A seeded Llama of `hidden` width with the word-level tokenizer."""
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)  # large weights: varied, seed-specific tokens
    model.save_pretrained(str(directory), safe_serialization=True)
    save_tokenizer(directory)
    return directory
