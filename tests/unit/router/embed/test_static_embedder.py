"""The static embedder: distilled from the real MiniLM over a small slice of its vocabulary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.router_latency import load_prompt_file
from router.embed import static_embedder as static
from router.embed.embedder import make_embedder
from router.embed.names import KNOWN_EMBEDDERS, STATIC_EMBEDDER_NAME, variant_name
from router.embed.static_embedder import DistillSettings, StaticEmbedder, StaticEmbedderError
from tests.conftest import PROJECT_ROOT

# Ids below 2100 hold BERT's single characters (999-1995) and its ~100 commonest words.
SETTINGS = DistillSettings(pca_dims=None, sif_coefficient=1e-3, vocab_limit=2100)
PCA_SETTINGS = DistillSettings(pca_dims=16, sif_coefficient=1e-3, vocab_limit=1100)
TEXTS = ["The sum of two and three.", "What is the time?", "a b c", "of the"]
TOKENIZER_CASES = [
    "Ünïcödé naïve café — “quotes” ‘x’ … €5 £3 ¥ ° ± × ÷ 中文字符測試 日本語のテキスト 한국어",
    "İstanbul ΣΊΣΥΦΟΣ Straße ǅ ﬁ ① ² ＡＢＣ　全角 Ελληνικά русский العربية हिन्दी ไทย",
    "tab\tnew\nline\r\x0b\x0c\x00\x7f\x85\u2028\u2029\u00a0\u200b\ufeff\ufffd",
    "emoji 😀👍🏽 zwj 👨\u200d👩\u200d👧 \U0010ffff a\u0378b \ue000 \U000e0001",
    "a" * 150 + " " + "b" * 99,
    "snake_case x_1 $HOME @user #tag ~/path {a:[1,2]} `code` \\\\ | ^ < > = Don't",
    "",
    "   ",
]
PROMPTS_DIR = PROJECT_ROOT.parent / "shared" / "data" / "prompts"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("static-cache")


@pytest.fixture(scope="module")
def embedder(cache_dir: Path) -> StaticEmbedder:
    return static.load_or_build_static_embedder(SETTINGS, cache_dir, progress=lambda _m: None)


@pytest.fixture(scope="module")
def pca_embedder(cache_dir: Path) -> StaticEmbedder:
    return static.load_or_build_static_embedder(PCA_SETTINGS, cache_dir, progress=lambda _m: None)


def test_table_shape_and_metadata(embedder: StaticEmbedder) -> None:
    assert embedder.table.shape == (2100, 384) and embedder.dimension == 384
    meta = embedder.metadata
    assert meta["rows"] == 2100 and meta["dimension"] == 384
    assert meta["settings"]["vocab_limit"] == 2100
    assert len(meta["model_sha256"]) == 64 and meta["build_seconds"] > 0
    special = static.special_token_ids(embedder.tokenizer)
    assert {101, 102, 0, 103} <= special and 100 not in special  # [UNK] keeps a row
    assert not embedder.table[sorted(i for i in special if i < 2100)].any()


def test_one_token_text_matches_minilm(embedder: StaticEmbedder) -> None:
    """Without PCA a one-token text's vector is MiniLM's own vector of that text."""
    from router.embed.embedder import MiniLMEmbedder

    reference = MiniLMEmbedder().embed(["the", "!"])
    ours = embedder.embed(["the", "!"])
    assert np.allclose(np.sum(reference * ours, axis=1), 1.0, atol=1e-4)


def test_token_ids_match_the_fast_tokenizer(embedder: StaticEmbedder) -> None:
    ids = static.BertTokenIds(embedder.tokenizer)
    for text in TOKENIZER_CASES:
        assert ids(text) == embedder.tokenizer.encode(text, add_special_tokens=False).ids, text
    assert ids(TOKENIZER_CASES[4])[0] == embedder.tokenizer.token_to_id("[UNK]")  # > 100 chars


def test_token_ids_match_on_real_prompts(embedder: StaticEmbedder) -> None:
    files = sorted(PROMPTS_DIR.glob("*.jsonl"))
    if not files:
        pytest.skip(f"no prompt files in {PROMPTS_DIR}")
    ids = static.BertTokenIds(embedder.tokenizer)
    for path in files:
        for text in load_prompt_file(path)[:200]:
            assert ids(text) == embedder.tokenizer.encode(text, add_special_tokens=False).ids


def test_vectors_are_unit_deterministic_and_batch_independent(embedder: StaticEmbedder) -> None:
    batch = embedder.embed(TEXTS)
    assert batch.shape == (len(TEXTS), 384) and batch.dtype == np.float32
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    singles = np.vstack([embedder.embed([t]) for t in TEXTS])
    assert np.allclose(batch, singles, atol=1e-6)
    assert np.array_equal(embedder.embed(TEXTS), batch)
    assert np.allclose(embedder.embed(["The SUM of two and three."]), batch[0], atol=1e-6)
    assert not np.allclose(batch[0], batch[1], atol=1e-2)


def test_empty_and_unknown_inputs(embedder: StaticEmbedder) -> None:
    assert embedder.embed([]).shape == (0, 384)
    blank, unknown, mixed = embedder.embed(["", "\u2603\U0001f600", "the \U0001f600"])
    assert not blank.any()  # no tokens at all: nothing to point anywhere
    assert np.isclose(np.linalg.norm(unknown), 1.0)  # [UNK]'s distilled row
    assert np.isclose(np.linalg.norm(mixed), 1.0)
    # A word whose id lies beyond a partial table adds nothing.
    assert embedder.token_ids("hysteria").size == 0
    assert np.allclose(embedder.embed(["the hysteria"]), embedder.embed(["the"]), atol=1e-6)


def test_earlier_vocabulary_ranks_weigh_less(embedder: StaticEmbedder) -> None:
    weights = static.sif_weights(100, 1e-3)
    assert np.all(np.diff(weights) > 0) and weights.max() < 1
    assert np.all(static.sif_weights(5, None) == 1)
    # Without PCA each distilled row is unit length times its weight.
    norms = np.linalg.norm(embedder.table, axis=1)
    exclaim, the = embedder.tokenizer.token_to_id("!"), embedder.tokenizer.token_to_id("the")
    assert exclaim < the and 0 < norms[exclaim] < norms[the] < 1


def test_pca_reduces_dimensions(pca_embedder: StaticEmbedder) -> None:
    assert pca_embedder.dimension == 16 and pca_embedder.table.shape == (1100, 16)
    vectors = pca_embedder.embed(["a b c", "x y z"])
    assert vectors.shape == (2, 16)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_saved_table_is_reused_not_rebuilt(
    embedder: StaticEmbedder, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the cached table should have been loaded")

    monkeypatch.setattr(static, "distill_static_embedder", refuse)
    loaded = static.load_or_build_static_embedder(SETTINGS, cache_dir)
    assert np.array_equal(loaded.table, embedder.table)
    assert loaded.metadata == embedder.metadata
    assert np.array_equal(loaded.embed(TEXTS), embedder.embed(TEXTS))
    directory = static.table_directory(cache_dir, embedder.metadata["model_sha256"], SETTINGS)
    assert (directory / static.TABLE_FILE).is_file()
    assert not list(directory.parent.glob(".building-*"))


def test_distillation_is_deterministic() -> None:
    settings = DistillSettings(pca_dims=8, vocab_limit=1010)
    first = static.distill_static_embedder(settings, progress=lambda _m: None)
    second = static.distill_static_embedder(settings, progress=lambda _m: None)
    assert np.array_equal(first.table, second.table)


def copy_of(embedder: StaticEmbedder, cache_dir: Path, target: Path) -> Path:
    source = static.table_directory(cache_dir, embedder.metadata["model_sha256"], SETTINGS)
    shutil.copytree(source, target)
    return target


def test_table_from_other_weights_is_refused(
    embedder: StaticEmbedder, cache_dir: Path, tmp_path: Path
) -> None:
    directory = copy_of(embedder, cache_dir, tmp_path / "copy")
    meta = json.loads((directory / static.METADATA_FILE).read_text())
    meta["model_sha256"] = "0" * 64
    (directory / static.METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(StaticEmbedderError, match="distilled from other files"):
        static.load_static_embedder(directory)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / static.TABLE_FILE).unlink(), "does not exist"),
        (lambda d: (d / static.TABLE_FILE).write_bytes(b"not safetensors"), "unreadable"),
        (lambda d: (d / static.METADATA_FILE).write_text("{oops"), "unreadable"),
        (lambda d: (d / static.METADATA_FILE).write_text("{}"), "format_version"),
    ],
)
def test_damaged_tables_are_named(
    embedder: StaticEmbedder,
    cache_dir: Path,
    tmp_path: Path,
    damage: object,
    message: str,
) -> None:
    directory = copy_of(embedder, cache_dir, tmp_path / "copy")
    assert callable(damage)
    damage(directory)
    with pytest.raises(StaticEmbedderError, match=message) as error:
        static.load_static_embedder(directory)
    assert str(directory) in str(error.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"pca_dims": 0}, {"sif_coefficient": 0.0}, {"sif_coefficient": -1.0}, {"vocab_limit": 0}],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DistillSettings(**kwargs)  # type: ignore[arg-type]


def test_pca_wider_than_the_model_is_refused() -> None:
    with pytest.raises(ValueError, match="pca_dims 500 exceeds"):
        static.pca_rotate(np.ones((10, 4), dtype=np.float32), 500)


def test_embedder_names() -> None:
    assert variant_name(128, True) == "all-MiniLM-L6-v2-int8-seq128"
    assert variant_name(None, False) == "all-MiniLM-L6-v2"
    assert STATIC_EMBEDDER_NAME in KNOWN_EMBEDDERS
    for bad in ("all-MiniLM-L6-v2-seq", "minilm", "all-MiniLM-L6-v2-int4"):
        with pytest.raises(ValueError, match="unknown embedder"):
            make_embedder(bad)
    with pytest.raises(ValueError, match="max_seq_length must be in"):
        make_embedder("all-MiniLM-L6-v2-seq4")


def test_name_keys_the_table(embedder: StaticEmbedder, pca_embedder: StaticEmbedder) -> None:
    """Cached vectors are keyed by the name: other settings or weights get another name."""
    sha = embedder.metadata["model_sha256"][:12]
    assert embedder.name == f"all-MiniLM-L6-v2-static-full-sif0.001-v2100-{sha}"
    assert pca_embedder.name != embedder.name
