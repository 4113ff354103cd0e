"""Memory of a Ray application's replica processes, read from /proc (no Ray needed).

PSS splits every shared page between the processes that map it, so summing it over
processes counts a shared page once. Ray's object store is a shared-memory file the
raylet creates and every worker maps; `pss_split` tells its pages apart, so a system's
memory can be read with and without the object store it keeps weights in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# The object store's file ("/dev/shm/plasmaXXXXXX"; Ray falls back to /tmp).
OBJECT_STORE_MAPPING = "/plasma"


@dataclass(frozen=True)
class ProcessMemory:
    """The replica processes of an application and their PSS, with and without what
    they map of Ray's object store (whose pages the raylet shares with them)."""

    processes: int = 0
    pss_bytes: int = 0
    pss_outside_store_bytes: int = 0
    # The same without the store, summed per deployment (which process holds what).
    outside_store_by_deployment: dict[str, int] = field(default_factory=dict)


# A mapping of the object store ("7f..-7f.. rw-s 0 00:1b 14 /dev/shm/plasmaXY (deleted)")
# and the PSS line that follows it in /proc/PID/smaps. No multi-line anchors: with
# them a regex scans a torch process's smaps (about a megabyte) 80 times slower.
_STORE_MAPPING = re.compile(
    rb"\n[0-9a-f]+-[0-9a-f]+ [^\n]*" + re.escape(OBJECT_STORE_MAPPING.encode()) + rb"[^/\n]*\n"
)
_PSS_LINE = re.compile(rb"\nPss: +(\d+) kB")
# While a replica runs a call, Ray titles its process "<actor>.<method>".
_RAY_METHOD = re.compile(
    r"\.(?:handle_request\w*|initialize_and_get_metadata|reconfigure|check_health"
    r"|record_routing_stats|perform_graceful_shutdown|get_\w+|_\w+)$"
)


def pss_split(smaps: bytes) -> tuple[int, int]:
    """(PSS, PSS of object-store mappings) in bytes, from a /proc/PID/smaps text."""
    smaps = b"\n" + smaps  # every line, the first one too, starts after a newline
    total = sum(int(kb) for kb in _PSS_LINE.findall(smaps)) * 1024
    store = 0
    for mapping in _STORE_MAPPING.finditer(smaps):
        pss = _PSS_LINE.search(smaps, mapping.end() - 1)
        if pss is not None:
            store += int(pss.group(1)) * 1024
    return total, store


def deployment_of(title: str, app_name: str) -> str | None:
    """The deployment a process titled `title` is a replica of in `app_name`, or None."""
    prefix = f"ray::ServeReplica:{app_name}:"
    if not title.startswith(prefix):
        return None
    return _RAY_METHOD.sub("", title[len(prefix) :].split()[0])


def replica_memory(app_name: str) -> ProcessMemory:
    """The application's replica processes: how many, and their summed PSS (shared
    pages split fairly), with and without the object store's pages."""
    import psutil

    processes = total = outside = 0
    by_deployment: dict[str, int] = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        deployment = deployment_of(cmdline[0], app_name) if cmdline else None
        if deployment is None:
            continue
        try:
            pss, store = pss_split(Path(f"/proc/{process.pid}/smaps").read_bytes())
        except OSError:  # exited meanwhile
            continue
        processes += 1
        total += pss
        outside += pss - store
        by_deployment[deployment] = by_deployment.get(deployment, 0) + pss - store
    return ProcessMemory(processes, total, outside, by_deployment)
