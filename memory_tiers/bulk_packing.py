"""Packing many experts at once: each distinct source read once, several at a time.

A config of 150 experts must not read 150 checkpoints one after another, nor the same
checkpoint once per expert that shares it (the demo's specialists share one). Sources
with the same key are packed once and that buffer goes to each of them; distinct ones
may be packed on several threads when their sources are thread-safe (transformers'
loader is not: the placement service packs checkpoints on one). Each result is handed
over as soon as it is ready, so at most a few packed buffers are held at once however
many experts there are.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed

from memory_tiers.ddr import ExpertSource, Packed

# What each expert's packing gave: its buffer and index, or the error it raised.
PackOutcome = Packed | BaseException
Progress = Callable[[int, int], None]  # (sources packed so far, sources in all)


def pack_many(
    sources: Mapping[str, ExpertSource],
    keys: Mapping[str, Hashable],
    on_packed: Callable[[str, PackOutcome], None],
    *,
    workers: int = 1,
    progress: Progress | None = None,
) -> int:
    """Pack every expert of `sources`; experts with equal `keys` share one packing.

    `on_packed(expert, outcome)` runs on the calling thread, once per expert, as each
    source finishes. Returns how many sources were packed (distinct keys).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    groups: dict[Hashable, list[str]] = {}
    for expert in sources:
        groups.setdefault(keys[expert], []).append(expert)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pack") as pool:
        pending: dict[Future[Packed], list[str]] = {
            pool.submit(sources[experts[0]].build): experts for experts in groups.values()
        }
        for done, future in enumerate(as_completed(pending), start=1):
            outcome: PackOutcome
            try:
                outcome = future.result()
            except Exception as error:  # one bad source must not stop the others
                outcome = error
            for expert in pending.pop(future):
                on_packed(expert, outcome)
            if progress is not None:
                progress(done, len(groups))
    return len(groups)
