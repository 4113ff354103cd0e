"""Arena files left in shared memory: which are still in use, and removing those that are not.

A file arena lives in /dev/shm, outside every process, so its memory is held until the
file is removed. Every process that maps one holds a shared ``flock`` on it for as long
as it does (``DeviceArena``), and the kernel drops the lock with the process however it
ends. A file nobody locks is therefore mapped by nobody: the cluster that made it is
gone (stopped, killed, or its machine's Ray stopped), and the file only holds memory.
A file of another user's is never touched.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
from pathlib import Path


def remove_unused(path: Path) -> bool:
    """Remove the arena file ``path`` when it is ours and no process maps it; True if removed."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # gone already, or a link: not an arena of ours
        return False
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid():
            return False
        try:
            # Held until the file is gone: a process attaching now waits, then sees
            # that the name no longer leads to this file.
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # mapped by a live process
        try:
            current = os.stat(path, follow_symlinks=False)
        except OSError:
            return False
        if (current.st_dev, current.st_ino) != (status.st_dev, status.st_ino):
            return False  # replaced by a new arena meanwhile
        os.unlink(path)
        return True
    finally:
        os.close(descriptor)


def remove_stale(directory: Path, names: re.Pattern[str], keep: Path | None = None) -> list[Path]:
    """Remove every arena file in ``directory`` whose name matches ``names`` and that no
    process maps, except ``keep``; returns those removed."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    removed = []
    for name in entries:
        path = Path(directory) / name
        if names.fullmatch(name) and path != keep and remove_unused(path):
            removed.append(path)
    return removed
