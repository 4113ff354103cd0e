"""Load-test workloads: Poisson arrivals, Zipf popularity, prompt files, replayability."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.harness import workload as wl
from benchmarks.harness.workload import (
    WorkloadError,
    closed_loop,
    load_prompts,
    open_loop,
    phased_arrivals,
    phased_open_loop,
    poisson_arrivals,
    sample_experts,
    zipf_weights,
)

EXPERTS = ["math", "code", "writing", "law"]
PROMPTS = [f"prompt number {i}" for i in range(40)]
SHARED_PROMPTS = wl.PROJECT_ROOT.parent / "shared" / "data" / "prompts"


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# --- arrivals ------------------------------------------------------------------------


def test_poisson_rate_and_gaps_match_the_process() -> None:
    rate, count = 50.0, 20_000
    offsets = np.asarray(poisson_arrivals(rate, count, None, np.random.default_rng(11)))
    assert len(offsets) == count
    assert np.all(np.diff(offsets) >= 0) and offsets[0] > 0
    measured = count / offsets[-1]
    # The rate estimate's standard error is rate / sqrt(n).
    assert abs(measured - rate) < 3 * rate / math.sqrt(count)
    gaps = np.diff(np.concatenate([[0.0], offsets]))
    cv = gaps.std() / gaps.mean()
    assert abs(cv - 1.0) < 0.05  # exponential gaps: coefficient of variation 1


def test_poisson_duration_bound_is_respected() -> None:
    rate, duration = 50.0, 100.0
    offsets = poisson_arrivals(rate, None, duration, np.random.default_rng(3))
    assert max(offsets) < duration
    expected = rate * duration
    assert abs(len(offsets) - expected) < 3 * math.sqrt(expected)
    both = poisson_arrivals(rate, 10, duration, np.random.default_rng(3))
    assert len(both) == 10
    short = poisson_arrivals(rate, 10_000, 2.0, np.random.default_rng(3))
    assert len(short) < 10_000 and max(short) < 2.0


@pytest.mark.parametrize("rate", [0.0, -1.0, math.nan, math.inf])
def test_bad_rate_is_refused(rate: float) -> None:
    with pytest.raises(WorkloadError, match="rate"):
        poisson_arrivals(rate, 10, None, np.random.default_rng(0))
    with pytest.raises(WorkloadError, match="rate"):
        open_loop(PROMPTS, EXPERTS, rate=rate, count=10)


@pytest.mark.parametrize(
    ("count", "duration", "match"),
    [(None, None, "bound"), (0, None, "count"), (None, 0.0, "duration"), (None, -5.0, "duration")],
)
def test_bad_bounds_are_refused(count: int | None, duration: float | None, match: str) -> None:
    with pytest.raises(WorkloadError, match=match):
        poisson_arrivals(1.0, count, duration, np.random.default_rng(0))


def test_phased_arrivals_follow_each_phase_rate() -> None:
    phases = [(200.0, 5.0), (100.0, 0.0), (200.0, 40.0)]
    offsets = np.asarray(phased_arrivals(phases, np.random.default_rng(8)))
    assert np.all(np.diff(offsets) >= 0) and offsets[-1] < 500.0
    for (low, high), rate in [((0, 200), 5.0), ((300, 500), 40.0)]:
        n = int(np.sum((offsets >= low) & (offsets < high)))
        expected = rate * (high - low)
        assert abs(n - expected) < 3 * math.sqrt(expected)
    assert not np.any((offsets >= 200) & (offsets < 300))  # the idle phase


@pytest.mark.parametrize(
    ("phases", "match"),
    [
        ([], "no phases"),
        ([(10.0, -1.0)], "rate"),
        ([(0.0, 1.0)], "duration"),
        ([(5.0, 0.0)], "no request"),
    ],
)
def test_bad_phases_are_refused(phases: list[tuple[float, float]], match: str) -> None:
    with pytest.raises(WorkloadError, match=match):
        phased_open_loop(PROMPTS, EXPERTS, phases)


def test_phased_workload_spans_its_phases() -> None:
    workload = phased_open_loop(PROMPTS, EXPERTS, [(10.0, 2.0), (20.0, 8.0)], seed=3)
    assert workload.mode == "open" and workload.span_s == 30.0 and workload.rate is None
    assert workload.offered_rps == pytest.approx(len(workload) / 30.0)
    assert workload.describe()["phases"] == [[10.0, 2.0], [20.0, 8.0]]


# --- Zipf ----------------------------------------------------------------------------


def test_zipf_weights_are_exact() -> None:
    np.testing.assert_allclose(zipf_weights(3, 1.0), [6 / 11, 3 / 11, 2 / 11])
    np.testing.assert_allclose(zipf_weights(3, 2.0), np.array([1, 1 / 4, 1 / 9]) / (49 / 36))
    np.testing.assert_allclose(zipf_weights(5, 0.0), [0.2] * 5)


@pytest.mark.parametrize(("n", "s"), [(0, 1.0), (3, -0.5), (3, math.nan)])
def test_bad_zipf_arguments_are_refused(n: int, s: float) -> None:
    with pytest.raises(WorkloadError):
        zipf_weights(n, s)


@pytest.mark.parametrize("s", [0.0, 1.0, 1.5])
def test_sampled_frequencies_follow_the_weights(s: float) -> None:
    count = 20_000
    names = sample_experts(EXPERTS, s, count, np.random.default_rng(5))
    weights = zipf_weights(len(EXPERTS), s)
    for expert, p in zip(EXPERTS, weights, strict=True):
        frequency = names.count(expert) / count
        # Within 4 binomial standard errors.
        assert abs(frequency - p) < 4 * math.sqrt(p * (1 - p) / count), expert


def test_the_given_order_is_the_rank_order() -> None:
    names = sample_experts(["z-first", "a-second"], 2.0, 2000, np.random.default_rng(1))
    assert names.count("z-first") > names.count("a-second")


def test_duplicate_or_missing_experts_are_refused() -> None:
    with pytest.raises(WorkloadError, match="more than once"):
        sample_experts(["a", "b", "a"], 1.0, 5, np.random.default_rng(0))
    with pytest.raises(WorkloadError, match="no experts"):
        open_loop(PROMPTS, [], rate=1.0, count=5)


# --- workloads -----------------------------------------------------------------------


def test_same_seed_same_workload_and_skew_does_not_move_arrivals() -> None:
    first = open_loop(PROMPTS, EXPERTS, rate=5.0, count=200, zipf_s=1.0, seed=42)
    again = open_loop(PROMPTS, EXPERTS, rate=5.0, count=200, zipf_s=1.0, seed=42)
    other_seed = open_loop(PROMPTS, EXPERTS, rate=5.0, count=200, zipf_s=1.0, seed=43)
    flatter = open_loop(PROMPTS, EXPERTS, rate=5.0, count=200, zipf_s=0.0, seed=42)
    assert first == again
    assert first.requests != other_seed.requests
    assert [p.at_s for p in flatter.requests] == [p.at_s for p in first.requests]
    assert [p.prompt for p in flatter.requests] == [p.prompt for p in first.requests]
    assert [p.index for p in first.requests] == list(range(200))


def test_open_loop_offered_rate_and_description() -> None:
    workload = open_loop(PROMPTS, EXPERTS, rate=20.0, duration_s=50.0, seed=1)
    assert workload.mode == "open" and workload.span_s == 50.0
    assert workload.offered_rps == pytest.approx(len(workload) / 50.0)
    assert all(p.at_s is not None and p.at_s < 50.0 for p in workload.requests)
    described = workload.describe()
    assert described["requests"] == len(workload)
    assert sum(described["per_expert"].values()) == len(workload)
    assert json.loads(json.dumps(described)) == described


def test_closed_loop_has_no_arrival_times() -> None:
    workload = closed_loop(PROMPTS, EXPERTS, users=4, count=30, seed=2)
    assert workload.mode == "closed" and workload.users == 4 and len(workload) == 30
    assert all(p.at_s is None for p in workload.requests)
    assert workload.offered_rps is None
    with pytest.raises(WorkloadError, match="user"):
        closed_loop(PROMPTS, EXPERTS, users=0, count=30)


def test_stream_fraction() -> None:
    def streamed(fraction: float) -> int:
        workload = closed_loop(PROMPTS, EXPERTS, 1, 2000, stream_fraction=fraction, seed=9)
        return sum(p.stream for p in workload.requests)

    assert streamed(0.0) == 0
    assert streamed(1.0) == 2000
    half = streamed(0.5)
    assert abs(half - 1000) < 4 * math.sqrt(2000 * 0.25)
    with pytest.raises(WorkloadError, match="stream fraction"):
        streamed(1.5)


def test_router_popularity_uses_the_router_once_per_prompt() -> None:
    calls: list[str] = []

    def route(prompt: str) -> str:
        calls.append(prompt)
        return EXPERTS[int(prompt.rsplit(" ", 1)[1]) % len(EXPERTS)]

    workload = open_loop(PROMPTS, EXPERTS, rate=3.0, count=300, seed=4, expert_for_prompt=route)
    assert workload.popularity == "router" and workload.zipf_s is None
    for planned in workload.requests:
        assert planned.expert == route(planned.prompt)
    distinct = {p.prompt for p in workload.requests}
    assert len(calls) - len(workload.requests) == len(distinct)  # route() calls above + cache


def test_router_naming_an_unknown_expert_is_refused() -> None:
    with pytest.raises(WorkloadError, match="'nobody'"):
        closed_loop(PROMPTS, EXPERTS, 1, 5, expert_for_prompt=lambda _: "nobody")


def test_no_prompts_is_refused() -> None:
    with pytest.raises(WorkloadError, match="no prompts"):
        open_loop([], EXPERTS, rate=1.0, count=3)


# --- prompt files --------------------------------------------------------------------


def test_every_prompt_field_is_read(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "from prompt", "question": "ignored"},
            {"question": "from question"},
            {"text": "from text"},
            {
                "messages": [
                    {"role": "user", "content": "first"},
                    {"role": "user", "content": "last"},
                ]
            },
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]},
            "",
        ],
    )
    assert load_prompts([path]) == ["from prompt", "from question", "from text", "last", "parts"]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(WorkloadError, match=r"nowhere\.jsonl does not exist"):
        load_prompts([missing])


def test_empty_file_names_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(WorkloadError, match=r"empty\.jsonl holds no prompts"):
        load_prompts([empty])


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        ({"answer": "no prompt here"}, "needs a non-empty"),
        ({"prompt": "   "}, "needs a non-empty"),
        ({"prompt": 3}, "needs a non-empty"),
        ({"messages": [{"role": "system", "content": "only system"}]}, "needs a non-empty"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_line_names_the_file_and_line(tmp_path: Path, bad_line: object, match: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, bad_line])
    with pytest.raises(WorkloadError, match=rf"bad\.jsonl:2: {match}"):
        load_prompts([path])


def test_limit_takes_prompts_round_robin(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}"} for i in range(2)])
    assert load_prompts([a, b], limit=5) == ["a0", "b0", "a1", "b1", "a2"]
    assert len(load_prompts([a, b], limit=100)) == 7
    with pytest.raises(WorkloadError, match="limit"):
        load_prompts([a], limit=0)
    with pytest.raises(WorkloadError, match="no prompt files"):
        load_prompts([])


def test_the_shared_prompt_files_load() -> None:
    if not SHARED_PROMPTS.is_dir():
        pytest.skip(f"shared prompt data not found at {SHARED_PROMPTS}")
    files = wl.default_prompt_files()
    counts = {path.name: len(load_prompts([path])) for path in files}
    assert counts == {
        "arena_hard_v0.1.jsonl": 500,
        "arena_hard_v2.0.jsonl": 750,
        "gsm8k_test.jsonl": 1319,
        "humaneval.jsonl": 164,
    }
    assert len(load_prompts(files, limit=40)) == 40


def test_no_default_prompt_files_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wl, "DEFAULT_PROMPTS_DIR", tmp_path)
    with pytest.raises(WorkloadError, match="no prompt files in"):
        wl.default_prompt_files()
