"""Load-test summaries: percentiles, goodput under an SLO, errors by kind, and plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.harness.client import ErrorKind, Outcome
from benchmarks.harness.driver import RunResult
from benchmarks.harness.plots import plot_latency_cdf, plot_timeline
from benchmarks.harness.stats import (
    StatsError,
    latency_series,
    percentile,
    ratio,
    summarise,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def outcome(
    index: int,
    total_s: float,
    ttft_s: float | None = None,
    expert: str = "math",
    kind: ErrorKind | None = None,
    scheduled_s: float | None = None,
    started_s: float = 0.0,
) -> Outcome:
    ok = kind is None
    return Outcome(
        index=index,
        expert=expert,
        stream=ttft_s is not None,
        ok=ok,
        status=200 if ok else None,
        error_kind=kind,
        started_s=started_s,
        ttft_s=(ttft_s if ttft_s is not None else total_s) if ok else None,
        total_s=total_s,
        tokens=4 if ok else 0,
        served_by=expert if ok else None,
        scheduled_s=scheduled_s,
    )


def result_of(outcomes: list[Outcome], wall_s: float = 10.0) -> RunResult:
    return RunResult(
        outcomes=tuple(outcomes),
        wall_s=wall_s,
        offered_rps=1.0,
        achieved_rps=sum(o.ok for o in outcomes) / wall_s,
        mode="open",
        planned=len(outcomes),
        unsent=0,
        peak_in_flight=3,
        stopped_by="exhausted",
    )


# --- percentiles ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=60),
    st.floats(0, 100),
)
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    expected = float(np.percentile(np.asarray(values), q))
    assert percentile(values, q) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_on_fixed_points(q: float) -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.5]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5
    for q in (-1, 101, math.nan):
        with pytest.raises(StatsError, match="percentile"):
            percentile([1.0], q)


def test_ratio_is_safe() -> None:
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 2.0) is None
    assert ratio(2.0, None) is None


# --- summaries -----------------------------------------------------------------------


def test_goodput_counts_ok_requests_within_the_slo() -> None:
    outcomes = [
        outcome(0, 0.5),
        outcome(1, 0.9, ttft_s=0.1, expert="code"),
        outcome(2, 1.5),  # too slow
        outcome(3, 1.0, ttft_s=0.6),  # at the SLO exactly: counts
        outcome(4, 0.2, kind="http_5xx"),  # fast but failed
        outcome(5, 0.0, kind="timeout", expert="code"),
        outcome(6, 0.0, kind="http_429"),
        outcome(7, 0.0, kind="http_429"),
    ]
    summary = summarise(result_of(outcomes, wall_s=2.0), slo_s=1.0)
    assert summary["requests"] == 8 and summary["ok"] == 4
    assert summary["errors"] == {"http_429": 2, "http_5xx": 1, "timeout": 1}
    assert summary["error_count"] == 4
    assert summary["good"] == 3
    assert summary["goodput_rps"] == pytest.approx(3 / 2.0)
    assert summary["per_expert"] == {"math": 6, "code": 2}
    assert summary["served_by"] == {"math": 3, "code": 1}
    ok_totals = [0.5, 0.9, 1.5, 1.0]
    for q in (50, 90, 99):
        assert summary[f"p{q}_s"] == pytest.approx(np.percentile(ok_totals, q))
    assert summary["ttft_p50_s"] == pytest.approx(np.percentile([0.5, 0.1, 1.5, 0.6], 50))
    assert summary["tokens"] == 16 and summary["tokens_per_s"] == pytest.approx(8.0)

    with_ttft = summarise(result_of(outcomes, wall_s=2.0), slo_s=1.0, slo_ttft_s=0.5)
    # Request 3 (ttft 0.6) and request 0 (non-streaming: ttft = total 0.5, kept) differ.
    assert with_ttft["good"] == 2
    assert with_ttft["goodput_rps"] == pytest.approx(1.0)


def test_summary_of_a_run_with_no_success() -> None:
    summary = summarise(result_of([outcome(0, 0.0, kind="connection")]), slo_s=1.0)
    assert summary["ok"] == 0 and summary["goodput_rps"] == 0.0
    assert summary["p50_s"] is None and summary["ttft_p99_s"] is None and summary["mean_s"] is None


def test_send_lag_is_the_gap_between_plan_and_start() -> None:
    outcomes = [outcome(i, 0.1, scheduled_s=float(i), started_s=i + 0.01 * i) for i in range(5)]
    summary = summarise(result_of(outcomes), slo_s=1.0)
    assert summary["send_lag_p99_s"] == pytest.approx(
        np.percentile([0.0, 0.01, 0.02, 0.03, 0.04], 99)
    )


@pytest.mark.parametrize("slo", [0.0, -1.0, math.nan, math.inf, None])
def test_a_bad_or_missing_slo_is_refused(slo: float | None) -> None:
    with pytest.raises(StatsError, match="slo_s"):
        summarise(result_of([outcome(0, 0.1)]), slo_s=slo)


def test_a_bad_ttft_slo_is_refused() -> None:
    with pytest.raises(StatsError, match="slo_ttft_s"):
        summarise(result_of([outcome(0, 0.1)]), slo_s=1.0, slo_ttft_s=0.0)


def test_latency_series_is_sorted_and_skips_errors() -> None:
    result = result_of(
        [outcome(0, 0.3, ttft_s=0.2), outcome(1, 0.1), outcome(2, 9.0, kind="timeout")]
    )
    assert latency_series(result) == [0.1, 0.3]
    assert latency_series(result, "ttft") == [0.1, 0.2]


# --- plots ---------------------------------------------------------------------------


def test_plots_write_pngs(tmp_path: Path) -> None:
    cdf = plot_latency_cdf(
        {"coe": [0.1, 0.2, 0.4], "multiplex": [0.5, 3.0, 40.0], "resident": []},
        tmp_path / "figs" / "cdf.png",
        slo_s=1.0,
    )
    samples = [
        {"t": 0.0, "replicas": {"expert-a": 1, "expert-b": 0}, "resident": ["a"]},
        {"t": 1.0, "replicas": {"expert-a": 2, "expert-b": 1}, "resident": ["a", "b"]},
        {"t": 2.0, "replicas": {"expert-a": 1}},  # nothing known about residency
    ]
    timeline = plot_timeline({"coe": samples, "multiplex": []}, tmp_path / "timeline.png")
    for out in (cdf, timeline):
        assert out.read_bytes().startswith(PNG_SIGNATURE)
