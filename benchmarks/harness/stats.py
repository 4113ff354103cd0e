"""Summaries of a `RunResult`: rates, goodput under an SLO, latency percentiles.

    summary = summarise(result, slo_s=5.0, slo_ttft_s=1.0)   # JSON-ready dict
    cdf = {"coe": latency_series(result)}                    # for plots.plot_latency_cdf
    ratio(summary_a["p99_s"], summary_b["p99_s"])            # None when undefined

Latency percentiles are over successful requests only (a timeout or an error has no
meaningful latency; errors are counted by kind instead). Goodput counts successful
requests with `total_s <= slo_s` (and `ttft_s <= slo_ttft_s` when that is given) per
wall-clock second of the run.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from benchmarks.harness.client import Outcome
from benchmarks.harness.driver import RunResult

QUANTILES = (50, 90, 99)


class StatsError(ValueError):
    """A bad summary argument: an SLO or a percentile out of range."""


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks,
    as `numpy.percentile`'s default; None for no values."""
    if not (math.isfinite(q) and 0 <= q <= 100):
        raise StatsError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    fraction = rank - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _check_slo(name: str, value: float | None, required: bool) -> None:
    if value is None:
        if required:
            raise StatsError(f"{name} is required: a latency SLO in seconds > 0")
        return
    if not (math.isfinite(value) and value > 0):
        raise StatsError(f"{name} must be a finite number of seconds > 0, got {value}")


def meets_slo(outcome: Outcome, slo_s: float, slo_ttft_s: float | None = None) -> bool:
    if not outcome.ok or outcome.total_s > slo_s:
        return False
    if slo_ttft_s is None:
        return True
    return outcome.ttft_s is not None and outcome.ttft_s <= slo_ttft_s


def latency_series(result: RunResult, which: Literal["total", "ttft"] = "total") -> list[float]:
    """Sorted latencies (s) of the successful requests, total or time to first token."""
    if which == "total":
        return sorted(o.total_s for o in result.outcomes if o.ok)
    return sorted(o.ttft_s for o in result.outcomes if o.ok and o.ttft_s is not None)


def _percentiles(prefix: str, values: Sequence[float]) -> dict[str, float | None]:
    return {f"{prefix}p{q}_s": percentile(values, q) for q in QUANTILES}


def summarise(
    result: RunResult, slo_s: float | None, slo_ttft_s: float | None = None
) -> dict[str, Any]:
    """A JSON-ready summary of one run (see the module docstring for definitions)."""
    _check_slo("slo_s", slo_s, required=True)
    _check_slo("slo_ttft_s", slo_ttft_s, required=False)
    assert slo_s is not None
    outcomes = result.outcomes
    ok = [o for o in outcomes if o.ok]
    good = sum(meets_slo(o, slo_s, slo_ttft_s) for o in outcomes)
    wall = result.wall_s
    errors = Counter(o.error_kind for o in outcomes if not o.ok and o.error_kind is not None)
    lags = [o.started_s - o.scheduled_s for o in outcomes if o.scheduled_s is not None]
    served = Counter(o.served_by for o in ok if o.served_by is not None)
    tokens = sum(o.tokens for o in ok)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_count": len(outcomes) - len(ok),
        "planned": result.planned,
        "unsent": result.unsent,
        "wall_s": wall,
        "offered_rps": result.offered_rps,
        "achieved_rps": result.achieved_rps,
        "slo_s": slo_s,
        "slo_ttft_s": slo_ttft_s,
        "good": good,
        "goodput_rps": good / wall if wall > 0 else 0.0,
        **_percentiles("", [o.total_s for o in ok]),
        **_percentiles("ttft_", [o.ttft_s for o in ok if o.ttft_s is not None]),
        "mean_s": sum(o.total_s for o in ok) / len(ok) if ok else None,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "per_expert": dict(Counter(o.expert for o in outcomes).most_common()),
        "served_by": dict(served.most_common()),
        "stream_requests": sum(o.stream for o in outcomes),
        "peak_in_flight": result.peak_in_flight,
        # How late the client itself started requests against the plan (open loop):
        # large values mean the load generator, not the server, limited the run.
        "send_lag_p99_s": percentile(lags, 99),
        "stopped_by": result.stopped_by,
    }
