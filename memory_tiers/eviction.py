"""Eviction policies for a device cache (HBM tier) and the tier simulator.

A policy only ranks; the cache decides which residents are evictable (not leased,
not pinned) and how many bytes it needs. Each policy sees every access and every
eviction, and when room is needed orders the evictable residents, first = evict first.
Ties are always broken the same way (older last access first, then expert name) so
that a replayed trace gives the same decisions every time.

- ``lru``: evict the least recently accessed first.
- ``lfu``: evict the least frequently accessed first. Counts are *in-cache*: an
  evicted expert's count is forgotten, so a re-admitted expert starts again from its
  new accesses (otherwise an expert that was hot long ago would squat forever).
- ``cost_aware``: keep what is expensive to bring back and often used. Each expert
  carries an exponentially decayed access frequency ``f`` (half-life ``half_life_s``;
  every access adds 1 after decaying the old value to the access time). The score is

      score = f(now) * reload_seconds / nbytes

  i.e. the expected reload time saved per byte of device memory the expert occupies.
  Lowest score is evicted first. History survives eviction (decay makes it fade),
  because "often used" is exactly what must be remembered about an evicted expert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

POLICY_NAMES: tuple[str, ...] = ("lru", "lfu", "cost_aware")

DEFAULT_HALF_LIFE_S = 60.0


@runtime_checkable
class EvictionPolicy(Protocol):
    """Ranks evictable residents of one device."""

    name: str

    def on_access(self, expert: str, now: float) -> None:
        """Record that ``expert`` was used (hit or admission) at time ``now`` (seconds)."""
        ...

    def on_evict(self, expert: str) -> None:
        """Record that ``expert`` left the device."""
        ...

    def victim_order(
        self,
        candidates: Sequence[str],
        sizes: Mapping[str, int],
        reload_seconds: Mapping[str, float],
        now: float,
    ) -> list[str]:
        """Return ``candidates`` ordered, first = evict first."""
        ...


class _RecencyTracker:
    """Last access time per expert; never-seen experts count as oldest."""

    def __init__(self) -> None:
        self.last_access: dict[str, float] = {}

    def touch(self, expert: str, now: float) -> None:
        self.last_access[expert] = now

    def last(self, expert: str) -> float:
        return self.last_access.get(expert, -math.inf)


class LRUPolicy:
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._recency = _RecencyTracker()

    def on_access(self, expert: str, now: float) -> None:
        self._recency.touch(expert, now)

    def on_evict(self, expert: str) -> None:
        # Recency of a non-resident does not matter: it is re-set on admission.
        self._recency.last_access.pop(expert, None)

    def victim_order(
        self,
        candidates: Sequence[str],
        sizes: Mapping[str, int],
        reload_seconds: Mapping[str, float],
        now: float,
    ) -> list[str]:
        return sorted(candidates, key=lambda e: (self._recency.last(e), e))


class LFUPolicy:
    """Least frequently used first (in-cache counts); ties: least recently used first."""

    name = "lfu"

    def __init__(self) -> None:
        self._recency = _RecencyTracker()
        self.counts: dict[str, int] = {}

    def on_access(self, expert: str, now: float) -> None:
        self.counts[expert] = self.counts.get(expert, 0) + 1
        self._recency.touch(expert, now)

    def on_evict(self, expert: str) -> None:
        self.counts.pop(expert, None)
        self._recency.last_access.pop(expert, None)

    def victim_order(
        self,
        candidates: Sequence[str],
        sizes: Mapping[str, int],
        reload_seconds: Mapping[str, float],
        now: float,
    ) -> list[str]:
        return sorted(candidates, key=lambda e: (self.counts.get(e, 0), self._recency.last(e), e))


class CostAwarePolicy:
    """Lowest decayed_frequency x reload_seconds / nbytes first (see module docstring)."""

    name = "cost_aware"

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S) -> None:
        if not (half_life_s > 0 and math.isfinite(half_life_s)):
            raise ValueError(f"half_life_s must be a positive finite number, got {half_life_s!r}")
        self.half_life_s = half_life_s
        self._recency = _RecencyTracker()
        self._frequency: dict[str, float] = {}

    def _decayed(self, expert: str, now: float) -> float:
        value = self._frequency.get(expert, 0.0)
        if value == 0.0:
            return 0.0
        elapsed = max(0.0, now - self._recency.last(expert))
        return value * 0.5 ** (elapsed / self.half_life_s)

    def frequency(self, expert: str, now: float) -> float:
        """The decayed access frequency of ``expert`` at time ``now``."""
        return self._decayed(expert, now)

    def on_access(self, expert: str, now: float) -> None:
        self._frequency[expert] = self._decayed(expert, now) + 1.0
        self._recency.touch(expert, now)

    def on_evict(self, expert: str) -> None:
        # History is kept on purpose: an often-used expert stays valuable after eviction.
        return None

    def score(self, expert: str, nbytes: int, reload_s: float, now: float) -> float:
        """Expected reload seconds saved per resident byte; lowest is evicted first."""
        if nbytes <= 0:
            raise ValueError(f"size of expert {expert!r} must be positive, got {nbytes}")
        return self._decayed(expert, now) * reload_s / nbytes

    def victim_order(
        self,
        candidates: Sequence[str],
        sizes: Mapping[str, int],
        reload_seconds: Mapping[str, float],
        now: float,
    ) -> list[str]:
        missing = [e for e in candidates if e not in sizes or e not in reload_seconds]
        if missing:
            raise ValueError(
                f"cost_aware policy needs sizes and reload_seconds for every candidate; "
                f"missing for {sorted(missing)}"
            )
        return sorted(
            candidates,
            key=lambda e: (
                self.score(e, sizes[e], reload_seconds[e], now),
                self._recency.last(e),
                e,
            ),
        )


def make_policy(name: str, *, half_life_s: float = DEFAULT_HALF_LIFE_S) -> EvictionPolicy:
    """Build the policy called ``name`` (one of POLICY_NAMES); ValueError otherwise."""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "cost_aware":
        return CostAwarePolicy(half_life_s=half_life_s)
    raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
