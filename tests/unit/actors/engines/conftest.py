"""A real transformers engine small enough for unit tests: a byte-level BPE tokenizer
trained here on a few sentences, and a seeded random Llama (`build_tiny_expert`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from actors.engines.transformers_engine import TransformersEngine
from actors.weights.synthetic import build_tiny_expert

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stop string ends the answer early",
    "hello world, how are you today?",
]
END = "<|endoftext|>"


def save_bpe_tokenizer(directory: Path) -> Path:
    """A byte-level BPE like GPT-2's, so tokens merge across characters as real ones do."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=[END], show_progress=False)
    core.train_from_iterator(CORPUS * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=END, pad_token=END)
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-engine")
    return build_tiny_expert(root / "expert", 3, save_bpe_tokenizer(root / "tokenizer"))


@pytest.fixture
def tiny_engine(tiny_checkpoint: Path) -> TransformersEngine:
    return TransformersEngine("tiny", tiny_checkpoint, device="cpu")
