"""The build lock: one build of a cache directory at a time, the others wait a bounded time."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.weights.build_lock import LOCK_NAME, BuildLockTimeout, build_lock
from actors.weights.checkpoint import CheckpointError
from tests.conftest import PROJECT_ROOT

HOLDER = """
import sys
from pathlib import Path
from actors.weights.build_lock import build_lock
with build_lock(Path(sys.argv[1]), 5, print):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock on `tmp_path` until a line reaches its stdin."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        cwd=PROJECT_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "held"
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def release(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("\n")
    process.stdin.close()


def test_the_lock_file_is_private_and_names_its_holder(tmp_path: Path) -> None:
    lines: list[str] = []
    with build_lock(tmp_path, 5, lines.append):
        path = tmp_path / LOCK_NAME
        mode = path.lstat().st_mode
        assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600
        assert path.read_text().strip() == str(os.getpid())
    assert lines == []  # nobody else held it: no waiting line


def test_a_second_process_waits_then_gets_the_lock(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        release(holder)  # the waiting line is printed once, before the wait

    with build_lock(tmp_path, 300, on_line):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert holder.wait(timeout=60) == 0
    assert lines == [f"waiting for another build of {tmp_path} (pid {holder.pid})…"]


def test_the_wait_is_bounded_with_a_clear_error(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    with pytest.raises(BuildLockTimeout) as caught, build_lock(tmp_path, 0, print):
        pytest.fail("the lock is held by another process")
    message = str(caught.value)
    assert str(tmp_path) in message and f"pid {holder.pid}" in message
    assert "--wait-timeout" in message and "\n" not in message
    assert isinstance(caught.value, CheckpointError)  # the CLI's `error: ...`, exit 2


def test_a_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / LOCK_NAME).symlink_to(target)
    with pytest.raises(CheckpointError, match="symbolic link"), build_lock(tmp_path, 5, print):
        pytest.fail("a symlinked lock file was used")
    assert not target.exists()


def test_the_lock_is_released_when_the_build_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="conversion failed"), build_lock(tmp_path, 5, print):
        raise RuntimeError("conversion failed")
    probe = os.open(tmp_path / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held
    finally:
        os.close(probe)


def test_a_negative_timeout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout"), build_lock(tmp_path, -1, print):
        pass
