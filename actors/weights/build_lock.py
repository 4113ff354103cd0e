"""One build of a cache directory at a time: an exclusive lock file, waited for a bounded time.

Two `coe demo build` (or two `coe serve` starting) on one cache must not convert the
same checkpoint at once: they would race on the same final directory and the second
would do the first's minutes of work again. Whoever holds the lock builds; the others
wait, then find the checkpoints built.

The lock is `flock` on `<directory>/.build.lock`: the kernel drops it when its holder
exits, however it exits (a killed build never leaves a stale lock). The file stays in
place between builds (removing it would let two processes lock two different files).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from actors.weights.checkpoint import CheckpointError, Progress

LOCK_NAME = ".build.lock"
DEFAULT_WAIT_S = 1800.0  # a real build of both demo sources takes about a minute
POLL_S = 0.2


class BuildLockTimeout(CheckpointError):
    """Another build held the lock longer than this one would wait.

    A CheckpointError, so every caller that reports a checkpoint problem (the `coe`
    commands' one-line `error: ...`, exit 2) reports this one too.
    """


@contextmanager
def build_lock(directory: Path, timeout_s: float, progress: Progress) -> Iterator[None]:
    """Hold the build lock on `directory` (which must exist) for the `with` block.

    Waits at most `timeout_s` seconds for another holder, printing one line that names
    it, then raises `BuildLockTimeout`.
    """
    if timeout_s < 0:
        raise ValueError(f"the build lock timeout must be 0 or more seconds, not {timeout_s}")
    path = directory / LOCK_NAME
    fd = _open_lock_file(path)
    try:
        _acquire(fd, directory, timeout_s, progress)
        _name_holder(fd)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock


def _open_lock_file(path: Path) -> int:
    # O_NOFOLLOW: a symlink planted in the cache must not make us create or lock a
    # file elsewhere; 0600: nobody else may read or lock it.
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CheckpointError(
                f"{path} is a symbolic link; remove it (the build lock must be a plain file)"
            ) from None
        raise CheckpointError(f"cannot open the build lock {path}: {error.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a plain file; remove it (it is the build lock)")
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _acquire(fd: int, directory: Path, timeout_s: float, progress: Progress) -> None:
    if _try_lock(fd):
        return
    progress(f"waiting for another build of {directory} ({_holder(fd)})…")
    # Polled rather than a blocking flock: a blocking call could only be bounded by a
    # signal, which a library must not take over from its caller.
    deadline = time.monotonic() + timeout_s
    while not _try_lock(fd):
        if time.monotonic() >= deadline:
            raise BuildLockTimeout(
                f"another build of {directory} ({_holder(fd)}) still holds {directory / LOCK_NAME} "
                f"after {timeout_s:g}s; let it finish (or stop it) and run again, "
                "or wait longer with `coe demo build --wait-timeout SECONDS`"
            )
        time.sleep(POLL_S)


def _name_holder(fd: int) -> None:
    """Write our pid into the lock file, for the line a waiting build prints."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"
