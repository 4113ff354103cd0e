"""Request traces: JSONL and CSV files, their errors, and the seeded Zipf generator."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.tier_sim.trace import (
    Request,
    TraceError,
    load_csv,
    load_jsonl,
    load_trace,
    write_jsonl,
    zipf_probabilities,
    zipf_trace,
)


def test_jsonl_and_csv_load_sorted(tmp_path: Path) -> None:
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(
        '{"arrival_s": 2, "expert": "b"}\n\n{"arrival_s": 0.5, "expert": "a", "output_tokens": 7}\n'
    )
    assert load_trace(jsonl) == [Request(0.5, "a", 7), Request(2.0, "b", None)]
    table = tmp_path / "t.csv"
    table.write_text("arrival_s,expert,output_tokens\n1,x,\n0,y,3\n")
    assert load_trace(table) == [Request(0.0, "y", 3), Request(1.0, "x", None)]
    again = write_jsonl(load_trace(table), tmp_path / "again.jsonl")
    assert load_jsonl(again) == load_csv(table)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('{"arrival_s": 1}\n', "t.jsonl:1: missing 'expert'"),
        ('{"arrival_s": 0, "expert": "a"}\n{oops\n', "t.jsonl:2: not valid JSON"),
        ('{"arrival_s": -1, "expert": "a"}\n', "got -1"),
        ('{"arrival_s": "soon", "expert": "a"}\n', "got 'soon'"),
        ('{"arrival_s": NaN, "expert": "a"}\n', "finite"),
        ('{"arrival_s": 0, "expert": "a", "output_tokens": 1.5}\n', "got 1.5"),
        ('{"arrival_s": 0, "expert": "  "}\n', "non-empty string"),
        ('{"arrival_s": 0, "expert": 5}\n', "got 5"),
        ('{"arrival_s": 0, "expert": "a", "user": 1}\n', "unknown field(s) ['user']"),
        ("[1, 2]\n", "must be a JSON object, got list"),
        ("\n", "has no requests"),
    ],
)
def test_bad_jsonl_rows(tmp_path: Path, body: str, fragment: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(TraceError) as error:
        load_jsonl(path)
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("time,expert\n1,a\n", "lacks column(s) ['arrival_s']"),
        ("arrival_s,expert\n0,a\n1,b,extra\n", "t.csv:3: more values than header"),
        ("arrival_s,expert,output_tokens\n0,a,-2\n", "t.csv:2: output_tokens"),
    ],
)
def test_bad_csv_rows(tmp_path: Path, body: str, fragment: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(TraceError) as error:
        load_csv(path)
    assert fragment in str(error.value)


def test_trace_file_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"cannot read trace .*missing\.jsonl"):
        load_trace(tmp_path / "missing.jsonl")
    with pytest.raises(TraceError, match=r"unknown format '\.txt'"):
        load_trace(tmp_path / "t.txt")


def test_zipf_generator_is_deterministic() -> None:
    first = zipf_trace(300, 20, 1.2, seed=7)
    assert first == zipf_trace(300, 20, 1.2, seed=7)
    assert first != zipf_trace(300, 20, 1.2, seed=8)
    arrivals = [request.arrival_s for request in first]
    assert arrivals == sorted(arrivals)


def test_zipf_generator_is_skewed_as_specified() -> None:
    n_experts, n_requests, s = 150, 20_000, 1.0
    probabilities = zipf_probabilities(n_experts, s)
    assert probabilities.sum() == pytest.approx(1.0)
    assert np.all(np.diff(probabilities) < 0)
    # P(rank 1) = 1 / H_150 for s = 1.
    assert probabilities[0] == pytest.approx(1 / sum(1 / k for k in range(1, 151)))
    trace = zipf_trace(n_requests, n_experts, s, seed=0)
    counts = np.bincount([int(r.expert.split("-")[1]) for r in trace], minlength=n_experts)
    for rank in (0, 1, 9, 99):
        p = probabilities[rank]
        sigma = math.sqrt(n_requests * p * (1 - p))
        assert abs(counts[rank] - n_requests * p) < 5 * sigma  # binomial, 5 sigma
    uniform = zipf_trace(n_requests, n_experts, 0.0, seed=0)
    top = max(sum(r.expert == name for r in uniform) for name in ("expert-000", "expert-149"))
    assert top < counts[0] / 5  # s = 0 has no head


@pytest.mark.parametrize("s", [-1.0, math.inf, math.nan])
def test_zipf_rejects_bad_exponent(s: float) -> None:
    with pytest.raises(ValueError, match="zipf exponent"):
        zipf_probabilities(10, s)
