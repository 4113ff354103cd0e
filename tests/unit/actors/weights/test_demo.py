from __future__ import annotations

import base64
import hashlib
import importlib.metadata
from pathlib import Path

import pytest

from actors.weights.checkpoint import CheckpointError, sha256_file, validate_checkpoint
from actors.weights.demo import SMOLLM2, _record_sha256, build_source, is_built


def test_smollm2_record_hash_is_the_files_sha256() -> None:
    distribution = importlib.metadata.distribution(SMOLLM2.package)
    path, published = _record_sha256(distribution, ".gguf")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(published) == 64
    record = next(f for f in distribution.files or [] if f.name == path.name)
    assert record.hash is not None
    padded = record.hash.value + "=" * (-len(record.hash.value) % 4)
    assert base64.urlsafe_b64decode(padded).hex() == published


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_unknown_demo_source(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="unknown demo source"):
        build_source(tmp_path, "llama-70b", print)


def test_half_built_directory_is_not_built(tmp_path: Path) -> None:
    directory = tmp_path / "smollm2-135m-instruct"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    assert not is_built(tmp_path, "smollm2-135m-instruct")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([], "config.json"),
        (["config.json"], "safetensors"),
        (["config.json", "model.safetensors"], "tokenizer"),
    ],
)
def test_validate_checkpoint_says_what_is_missing(
    tmp_path: Path, files: list[str], message: str
) -> None:
    for name in files:
        (tmp_path / name).write_text("{}")
    with pytest.raises(CheckpointError, match=message):
        validate_checkpoint(tmp_path)


def test_built_source_is_not_rebuilt(tmp_path: Path) -> None:
    directory = tmp_path / "smollm2-135m-instruct"
    directory.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "coe-source.json"):
        (directory / name).write_text("{}")
    lines: list[str] = []
    assert build_source(tmp_path, "smollm2-135m-instruct", lines.append) == directory
    assert lines == [f"smollm2-135m-instruct: already built at {directory}"]
