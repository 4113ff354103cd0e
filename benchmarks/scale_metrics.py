"""What the scale benchmark measures besides the harness's summary.

- **Residency at send time.** A `ResidencyWatch` asks the running system every fraction
  of a second which experts it holds ready (`RunningSystem.resident`); a request counts
  as *resident* when its expert was in the last answer received before the request was
  sent. An answer is stamped with the time it arrived, so it never tells of a state
  later than that; a switch that completes between two answers is seen one interval late.
- **Switch overhead**: TTFT p50 of the non-resident requests minus that of the resident.
- **Copy bound**: an expert's bytes over the `numpy.copyto` bandwidth measured in the
  run, the least a switch that copies them can take.
- **Object-store spills**: what Ray spilled to disk and restored, from `ray memory
  --stats-only` (Ray's command line: no public Python API reports it).
"""

from __future__ import annotations

import bisect
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness.client import Outcome
from benchmarks.harness.stats import percentile


@dataclass
class ResidencyWatch:
    """Polls `resident()` every `interval_s` in a thread; `snapshots` are (monotonic
    time the answer arrived, experts held ready)."""

    resident: Callable[[], Sequence[str]]
    interval_s: float = 0.25
    snapshots: list[tuple[float, frozenset[str]]] = field(default_factory=list)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ResidencyWatch:
        self.poll()  # a first answer before any request is sent
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        try:
            held = frozenset(self.resident())
        except Exception:  # a missed answer leaves the last one standing
            self.failures += 1
            return
        self.snapshots.append((time.monotonic(), held))

    def held_at(self, moment: float) -> frozenset[str] | None:
        """The experts of the last answer received at or before `moment` (None: none yet)."""
        times = [t for t, _ in self.snapshots]
        position = bisect.bisect_right(times, moment)
        return self.snapshots[position - 1][1] if position else None


def resident_flags(
    outcomes: Sequence[Outcome], start_monotonic: float, watch: ResidencyWatch
) -> list[bool]:
    """Per outcome: was its expert held ready when the request was sent?"""
    flags = []
    for outcome in outcomes:
        held = watch.held_at(start_monotonic + outcome.started_s)
        flags.append(held is not None and outcome.expert in held)
    return flags


def _latencies(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    total = [o.total_s for o in ok]
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "total_p50_s": percentile(total, 50),
        "total_p99_s": percentile(total, 99),
    }


def residency_split(outcomes: Sequence[Outcome], flags: Sequence[bool]) -> dict[str, Any]:
    """Latencies of the resident and the non-resident requests, and the switch overhead
    (non-resident TTFT p50 minus resident TTFT p50; None when either side is empty)."""
    resident = [o for o, flag in zip(outcomes, flags, strict=True) if flag]
    other = [o for o, flag in zip(outcomes, flags, strict=True) if not flag]
    split = {"resident": _latencies(resident), "nonresident": _latencies(other)}
    low, high = split["resident"]["ttft_p50_s"], split["nonresident"]["ttft_p50_s"]
    overhead = None if low is None or high is None else high - low
    return {**split, "switch_overhead_p50_s": overhead}


def copy_bound_p50_s(
    outcomes: Sequence[Outcome],
    flags: Sequence[bool],
    sizes: dict[str, int],
    bandwidth_bytes_per_s: float,
) -> float | None:
    """p50 over the non-resident requests of their expert's bytes / copy bandwidth."""
    bounds = [
        sizes[o.expert] / bandwidth_bytes_per_s
        for o, flag in zip(outcomes, flags, strict=True)
        if not flag and o.ok
    ]
    return percentile(bounds, 50)


def copyto_bandwidth(nbytes: int, repeats: int = 7) -> float:
    """Bytes/s of `numpy.copyto` between preallocated, faulted-in buffers (median)."""
    source = np.ones(nbytes, dtype=np.uint8)
    target = np.zeros(nbytes, dtype=np.uint8)
    np.copyto(target, source)  # first touch, like the arena's pre-faulted pages
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - started)
    return nbytes / statistics.median(times)


_STORE_LINE = re.compile(r"(Spilled|Restored) (\d+) MiB, (\d+) objects")


def parse_store_stats(text: str) -> dict[str, int]:
    """Spilled / restored MiB and objects from `ray memory --stats-only` (0 when Ray
    leaves a line out, as it does while nothing was spilled)."""
    found = {"spilled_mib": 0, "spilled_objects": 0, "restored_mib": 0, "restored_objects": 0}
    for kind, mib, objects in _STORE_LINE.findall(text):
        found[f"{kind.lower()}_mib"] = int(mib)
        found[f"{kind.lower()}_objects"] = int(objects)
    return found


def object_store_stats(gcs_address: str) -> dict[str, int] | None:
    """This Ray instance's spill counters; None when the command fails."""
    ray_command = Path(sys.executable).with_name("ray")
    try:
        done = subprocess.run(
            [str(ray_command), "memory", "--stats-only", "--address", gcs_address],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_store_stats(done.stdout)


def counter_delta(after: dict[str, int] | None, before: dict[str, int] | None) -> dict[str, int]:
    if after is None or before is None:
        return {}
    return {key: after[key] - before.get(key, 0) for key in after}
