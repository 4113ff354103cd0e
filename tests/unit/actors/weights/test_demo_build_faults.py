"""`coe demo build` under faults: a full disk, a killed build, two builds at once.

The build is the real one with a tiny model in place of each GGUF (see tiny_demo.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from actors.weights import demo
from actors.weights.checkpoint import (
    SOURCE_MARKER,
    CheckpointError,
    check_weights_complete,
    validate_checkpoint,
)
from tests.conftest import PROJECT_ROOT
from tests.unit.actors.weights.tiny_demo import Usage, make_tiny_source, use_tiny_demo

SOURCE = "smollm2-135m-instruct"
LOCK_FILE = ".build.lock"
START_WAIT_S = 300.0  # bounds on a broken test, never assertions on speed


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_source(tmp_path_factory.mktemp("tiny-source"))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def assert_loadable(directory: Path, tiny_source: Path) -> None:
    """Complete, marked as built, and the same weights as the tiny model it came from."""
    from transformers import AutoModelForCausalLM

    validate_checkpoint(directory)
    check_weights_complete(directory)
    assert json.loads((directory / SOURCE_MARKER).read_text())["gguf"] == "tiny.gguf"
    built = AutoModelForCausalLM.from_pretrained(str(directory))
    original = AutoModelForCausalLM.from_pretrained(str(tiny_source))
    for (name, mine), (_, theirs) in zip(
        built.state_dict().items(), original.state_dict().items(), strict=True
    ):
        assert torch.equal(mine, theirs), name


def leftovers(cache: Path) -> list[str]:
    """What a build left in the cache besides finished checkpoints and the lock file."""
    return sorted(
        p.name for p in cache.iterdir() if p.name != LOCK_FILE and not demo.is_built(cache, p.name)
    )


def disk_fills_part_way(error: Exception) -> Callable[..., None]:
    """A safetensors writer that writes half the file, then fails as a full disk does."""
    from safetensors.torch import save_file

    def write(tensors: dict[str, torch.Tensor], filename: str, metadata: object = None) -> None:
        save_file(tensors, filename, metadata=metadata)  # type: ignore[arg-type]
        os.truncate(filename, os.path.getsize(filename) // 2)
        raise error

    return write


FULL_DISK_ERRORS = [
    # What Python's own writes raise.
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors"),
    # What safetensors' Rust writer really raises on ENOSPC (seen on a full tmpfs).
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
]


@pytest.mark.parametrize("error", FULL_DISK_ERRORS, ids=["OSError", "SafetensorError"])
def test_a_full_disk_mid_write_keeps_nothing_and_the_next_build_is_whole(
    monkeypatch: pytest.MonkeyPatch, tiny_source: Path, cache: Path, error: Exception
) -> None:
    import transformers.modeling_utils

    use_tiny_demo(monkeypatch, tiny_source)
    real_writer = transformers.modeling_utils.safe_save_file
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_fills_part_way(error))
    with pytest.raises(CheckpointError) as caught:
        demo.build_source(cache, SOURCE, print)
    message = str(caught.value)
    assert "disk full" in message and str(cache) in message and "MB" in message
    assert "\n" not in message  # the CLI prints it as one `error: ...` line
    assert not (cache / SOURCE).exists()
    assert leftovers(cache) == []

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_writer)
    assert demo.build_source(cache, SOURCE, print) == cache / SOURCE
    assert_loadable(cache / SOURCE, tiny_source)
    assert leftovers(cache) == []


def test_too_little_free_space_fails_before_writing_anything(
    monkeypatch: pytest.MonkeyPatch, tiny_source: Path, cache: Path
) -> None:
    conversions = cache.parent / "conversions"
    use_tiny_demo(monkeypatch, tiny_source, conversions=conversions)
    monkeypatch.setattr(
        "shutil.disk_usage", lambda path: Usage(1 << 30, (1 << 30) - 5_000_000, 5_000_000)
    )
    with pytest.raises(CheckpointError, match="disk full") as caught:
        demo.build_source(cache, SOURCE, print)
    message = str(caught.value)
    assert str(cache) in message and "5 MB free" in message and "needs about" in message
    assert not conversions.exists()  # nothing was dequantised, let alone written
    assert leftovers(cache) == []


def make_killed_staging(cache: Path) -> list[Path]:
    """What a build killed mid-write leaves: its staging dir, and (from before staging
    dirs) convert_gguf's own `.partial` dir beside the final place."""
    staging = cache / f".{SOURCE}.build-dead1234"
    partial = cache / f"{SOURCE}.partial"
    for directory in (staging / SOURCE, partial):
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")
        (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00")
    return [staging, partial]


def test_a_killed_builds_staging_is_removed_and_the_source_built(
    monkeypatch: pytest.MonkeyPatch, tiny_source: Path, cache: Path
) -> None:
    use_tiny_demo(monkeypatch, tiny_source)
    left = make_killed_staging(cache)
    assert demo.build_source(cache, SOURCE, print) == cache / SOURCE
    assert_loadable(cache / SOURCE, tiny_source)
    assert not any(path.exists() for path in left)
    assert leftovers(cache) == []


def _no_marker(directory: Path) -> None:
    (directory / SOURCE_MARKER).unlink()


def _half_written_marker(directory: Path) -> None:
    (directory / SOURCE_MARKER).write_text('{"gguf": "tiny.gg')


@pytest.mark.parametrize("damage", [_no_marker, _half_written_marker])
def test_a_final_dir_without_a_whole_marker_is_rebuilt(
    monkeypatch: pytest.MonkeyPatch,
    tiny_source: Path,
    cache: Path,
    damage: Callable[[Path], None],
) -> None:
    use_tiny_demo(monkeypatch, tiny_source)
    demo.build_source(cache, SOURCE, print)
    weights = cache / SOURCE / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # what a half-done build would hold
    damage(cache / SOURCE)
    assert not demo.is_built(cache, SOURCE)
    lines: list[str] = []
    demo.build_source(cache, SOURCE, lines.append)
    assert any("incomplete" in line for line in lines), lines
    assert_loadable(cache / SOURCE, tiny_source)


def test_the_build_is_staged_privately_and_holds_the_lock(
    monkeypatch: pytest.MonkeyPatch, tiny_source: Path, cache: Path
) -> None:
    seen: dict[str, object] = {}

    def look() -> None:
        staging = [p for p in cache.iterdir() if p.name.startswith(f".{SOURCE}.build-")]
        seen["staging_modes"] = [stat.S_IMODE(p.stat().st_mode) for p in staging]
        seen["final_exists"] = (cache / SOURCE).exists()
        probe = os.open(cache / LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen["locked"] = False
        except BlockingIOError:
            seen["locked"] = True
        finally:
            os.close(probe)

    use_tiny_demo(monkeypatch, tiny_source, during_conversion=look)
    demo.build_source(cache, SOURCE, print)
    assert seen == {"staging_modes": [0o700], "final_exists": False, "locked": True}
    final = cache / SOURCE
    assert stat.S_IMODE(final.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in final.iterdir()} == {0o600}


def _start_cli_build(
    tiny_source: Path, cache: Path, conversions: Path, gate: Path, out: Path
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tests.unit.actors.weights.tiny_demo"]
    command += [str(tiny_source), str(conversions), str(gate), "--"]
    command += ["demo", "build", "--source", SOURCE]
    env = {
        **os.environ,
        "COE_CACHE_DIR": str(cache),
        "PYTHONIOENCODING": "utf-8",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    with out.open("wb") as sink:
        return subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT
        )


def _wait_until_one_waits(
    builds: list[subprocess.Popen[bytes]], outs: list[Path], conversions: Path
) -> None:
    """Until one build says it waits for the other, which is converting (held at the gate)."""
    deadline = time.monotonic() + START_WAIT_S
    while not any("waiting for another build" in out.read_text() for out in outs):
        converted = conversions.read_text().split() if conversions.exists() else []
        assert len(converted) < 2, "both builds converted: nothing kept them apart"
        for build, out in zip(builds, outs, strict=True):
            assert build.poll() is None, f"a build exited early:\n{out.read_text()}"
        assert time.monotonic() < deadline, "neither build ever waited for the other"
        time.sleep(0.05)


def test_two_builds_at_once_build_once(tiny_source: Path, tmp_path: Path) -> None:
    """Two `coe demo build` processes on one fresh cache, started together. Whichever
    converts first is held mid-conversion (at the gate) until the other says it waits;
    then the other finds the checkpoint built and converts nothing."""
    cache, conversions, gate = tmp_path / "cache", tmp_path / "conversions", tmp_path / "gate"
    gate.mkdir()
    outs = [tmp_path / "first.out", tmp_path / "second.out"]
    builds = [_start_cli_build(tiny_source, cache, conversions, gate, out) for out in outs]
    try:
        _wait_until_one_waits(builds, outs, conversions)
        (gate / "release").touch()
        codes = [build.wait(timeout=START_WAIT_S) for build in builds]
    finally:
        (gate / "release").touch()
        for build in builds:
            if build.poll() is None:
                build.kill()
                build.wait()
    texts = [out.read_text() for out in outs]
    assert codes == [0, 0], texts
    (converter,) = conversions.read_text().split()  # exactly one conversion
    builder = [build.pid for build in builds].index(int(converter))
    waiter_text = texts[1 - builder]
    assert f"waiting for another build of {cache} (pid {converter})" in waiter_text
    assert f"{SOURCE}: already built at {cache / SOURCE}" in waiter_text
    assert "dequantising" not in waiter_text and "dequantising" in texts[builder]
    assert_loadable(cache / SOURCE, tiny_source)
    assert leftovers(cache) == []
