"""Sentence embeddings cached on disk, keyed by a hash of each text's content.

Embedding thousands of questions is the slow part of every offline experiment, so
each text's vector is stored once under the cache directory and looked up by
`sha256(namespace, text)`. Any split of the same questions reuses the same vectors.
Shards are plain `.npz` files (read with allow_pickle=False) written atomically.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from router.embed.protocol import Embedder

_KEY_DTYPE = "S64"  # hex sha256, fixed width so the key array needs no pickle


def default_cache_dir() -> Path:
    """$COE_CACHE_DIR, then ~/.cache/coe (the same rule as the cluster's config)."""
    return Path(os.environ.get("COE_CACHE_DIR") or "~/.cache/coe").expanduser().resolve()


def content_key(namespace: str, text: str) -> str:
    digest = hashlib.sha256()
    digest.update(namespace.encode("utf-8"))
    digest.update(b"\0")
    digest.update(text.encode("utf-8"))
    return digest.hexdigest()


def embedder_namespace(embedder: Embedder) -> str:
    """A name that changes whenever the vectors would: the model name and dimension."""
    name = getattr(embedder, "name", type(embedder).__name__)
    return f"{name}-{embedder.dimension}"


class CachedEmbedder:
    """An `Embedder` that answers from disk when it can and embeds only the new texts."""

    def __init__(
        self,
        embedder: Embedder,
        cache_dir: Path | None = None,
        namespace: str | None = None,
        progress: Callable[[str], None] | None = None,
        chunk_size: int = 512,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.embedder = embedder
        # New texts are embedded and stored `chunk_size` at a time: a long cold run
        # reports as it goes, and an interrupted one keeps the chunks it finished.
        self.progress = progress
        self.chunk_size = chunk_size
        self.dimension = embedder.dimension
        self.namespace = namespace or embedder_namespace(embedder)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.namespace)
        self.directory = (cache_dir or default_cache_dir()) / "embeddings" / safe
        self._vectors: dict[str, np.ndarray] | None = None
        self.hits = 0
        self.misses = 0

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        known = self._load()
        keys = [content_key(self.namespace, text) for text in texts]
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in known and key not in missing:
                missing[key] = text
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        pending = list(missing.items())
        for start in range(0, len(pending), self.chunk_size):
            chunk = pending[start : start + self.chunk_size]
            chunk_keys = [key for key, _ in chunk]
            fresh = np.asarray(self.embedder.embed([text for _, text in chunk]), dtype=np.float32)
            expected = (len(chunk), self.dimension)
            if fresh.shape != expected:
                raise ValueError(f"embedder returned shape {fresh.shape}, expected {expected}")
            self._write_shard(chunk_keys, fresh)
            known.update(zip(chunk_keys, fresh, strict=True))
            if self.progress is not None:
                done = start + len(chunk)
                self.progress(f"embedded {done}/{len(pending)} new texts (cached from now on)")
        return np.stack([known[key] for key in keys])

    def _load(self) -> dict[str, np.ndarray]:
        if self._vectors is None:
            self._vectors = {}
            for shard in sorted(self.directory.glob("shard-*.npz")):
                self._vectors.update(_read_shard(shard, self.dimension))
        return self._vectors

    def _write_shard(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("".join(keys).encode("ascii")).hexdigest()[:16]
        # Write to a temporary file and rename, so a reader never sees half a shard.
        handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".npz.tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, keys=np.array(keys, dtype=_KEY_DTYPE), vectors=vectors)
            os.replace(temporary, self.directory / f"shard-{name}.npz")
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _read_shard(path: Path, dimension: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as shard:
            keys, vectors = shard["keys"], shard["vectors"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"unreadable embedding cache shard {path}: {error}") from error
    if vectors.ndim != 2 or vectors.shape[1] != dimension or len(keys) != len(vectors):
        raise ValueError(
            f"embedding cache shard {path} holds vectors of shape {vectors.shape}, "
            f"expected (*, {dimension}); delete it to rebuild"
        )
    return {key.decode("ascii"): vector for key, vector in zip(keys, vectors, strict=True)}
