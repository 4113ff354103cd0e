"""What the router decides for one prompt: a plain record, light to import.

Replicas that only pass decisions along (the ingress) unpickle it by reference to this
module, so it must not pull in the classifiers and their numerical libraries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RouteDecision:
    """Where one prompt goes and why."""

    expert: str
    category: str
    confidence: float
    fallback: bool  # True when confidence was below threshold and the generalist took it
    scores: dict[str, float]
    # sum_c p(c|x) * score[c, expert] when the router has a score table, else None.
    expected_quality: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
