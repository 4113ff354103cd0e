"""Tier simulator, hardware profiles and request traces (no Ray, no data files)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.tier_sim.paper_comparison import PAPER_SWITCH_SPEEDUP, paper_comparison
from benchmarks.tier_sim.profiles import (
    GB,
    HardwareProfile,
    ProfileError,
    available_profiles,
    load_profile,
    measure_this_machine,
    parse_profile,
    write_profile,
)
from benchmarks.tier_sim.simulator import SimulationError, hbm_capacity_experts, main, simulate
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
from memory_tiers.eviction import make_policy

UNIT = int(GB)  # every hand-worked expert is 1 GB


def profile_data(**overrides: Any) -> dict[str, Any]:
    """A small valid profile: 1 device, 3 GB HBM, 1000 GB/s link (1 ms per 1 GB switch)."""
    data: dict[str, Any] = {
        "name": "toy",
        "devices": 1,
        "device": {"kind": "toy", "hbm_gb": 3, "hbm_gb_per_s": 100, "host_link_gb_per_s": 1000},
        "host_memory_gb": 100,
        "expert_shards": 1,
        "sources": {
            key: "test"
            for key in (
                "devices",
                "device.hbm_gb",
                "device.hbm_gb_per_s",
                "device.host_link_gb_per_s",
                "host_memory_gb",
                "expert_shards",
            )
        },
    }
    for key, value in overrides.items():
        if key.startswith("device."):
            data["device"] = {**data["device"], key.split(".", 1)[1]: value}
        else:
            data[key] = value
    return data


def toy(**overrides: Any) -> HardwareProfile:
    return parse_profile(profile_data(**overrides))


def requests(experts: str, start: float = 0.0, step: float = 1.0) -> list[Request]:
    return [Request(start + i * step, name) for i, name in enumerate(experts.split())]


# --- policies in the simulator, against hand-worked traces ---------------------------------

HAND_TRACE = "A B C A D B E A"  # capacity 3 experts


def test_lru_hand_worked() -> None:
    # A B C miss; A hit; D evicts B (least recent); B evicts C; E evicts A; A evicts D.
    result = simulate(requests(HAND_TRACE), toy(), "lru", expert_bytes=UNIT)
    assert (result.hits, result.switches, result.evictions) == (1, 7, 4)
    assert result.per_expert["A"].requests == 3
    assert (result.per_expert["A"].hits, result.per_expert["A"].switches) == (1, 2)
    assert result.bytes_moved == 7 * UNIT
    assert result.switch_seconds == pytest.approx(7 * UNIT / (1000 * GB))
    assert result.hit_rate == pytest.approx(1 / 8)


def test_lfu_hand_worked() -> None:
    # A reaches count 2 at its hit; D evicts B (count 1, older than C), B evicts C,
    # E evicts D (count 1, older than B), so the last A is a hit.
    result = simulate(requests(HAND_TRACE), toy(), "lfu", expert_bytes=UNIT)
    assert (result.hits, result.switches, result.evictions) == (2, 6, 3)
    assert result.per_expert["A"].hits == 2


def test_cost_aware_forgets_old_heat_where_lfu_does_not() -> None:
    # A is hot early (3 uses), then B and C arrive 8 s later; capacity 2.
    # LFU keeps A (count 3) and evicts B for C, so the final B misses.
    # cost_aware with a 1 s half-life sees A's heat decayed to ~0 and evicts A instead.
    trace = [Request(t, e) for t, e in [(0, "A"), (1, "A"), (2, "A"), (10, "B"), (11, "C")]]
    trace.append(Request(12, "B"))
    small = toy(**{"device.hbm_gb": 2})
    lfu = simulate(trace, small, "lfu", expert_bytes=UNIT)
    decaying = make_policy("cost_aware", half_life_s=1.0)
    cost = simulate(trace, small, decaying, expert_bytes=UNIT)
    assert (lfu.hits, lfu.switches) == (2, 4)
    assert (cost.hits, cost.switches) == (3, 3)
    assert cost.per_expert["B"].hits == 1


def test_pinned_expert_never_leaves_and_costs_no_switch() -> None:
    # Capacity 2 with P pinned leaves one slot: A and B alternate through it.
    result = simulate(
        requests("A P B P A B"), toy(**{"device.hbm_gb": 2}), "lru", expert_bytes=UNIT, pinned=["P"]
    )
    assert result.per_expert["P"].hits == 2
    assert result.per_expert["P"].switches == 0
    assert result.switches == 4


def test_eviction_only_in_the_group_that_makes_room() -> None:
    # 2 devices of 2 GB, one expert per device: A,B fill group 0 and C,D group 1.
    # E: LRU order is A,B,C,D and evicting A alone makes room, so nothing else leaves.
    profile = toy(devices=2, **{"device.hbm_gb": 2})
    result = simulate(requests("A B C D E B C D"), profile, "lru", expert_bytes=UNIT)
    assert hbm_capacity_experts(profile, UNIT) == 4
    assert result.evictions == 1
    assert result.switches == 5
    assert result.hits == 3


def test_time_model_and_roofline_compute() -> None:
    # Switch = 1 GB at 1000 GB/s; decode reads 1 GB per token at 100 GB/s = 10 ms/token.
    trace = [Request(0.0, "A", 10), Request(0.0, "A", None)]
    result = simulate(
        trace, toy(), "lru", expert_bytes=UNIT, tokens_per_s="roofline", default_output_tokens=5
    )
    assert result.switch_seconds == pytest.approx(0.001)
    assert result.compute_seconds == pytest.approx(15 * 0.01)
    assert result.total_seconds == pytest.approx(0.001 + 0.15)
    # The second request waits for the first: latency 0.101 then 0.151.
    assert result.mean_latency_s == pytest.approx((0.101 + 0.151) / 2)
    fixed = simulate(trace, toy(), "lru", expert_bytes=UNIT, tokens_per_s=50.0)
    assert fixed.compute_seconds == pytest.approx(10 / 50.0)


def test_host_memory_overflow_is_reported() -> None:
    result = simulate(
        requests("A"), toy(host_memory_gb=2), "lru", expert_bytes=UNIT, catalog=["B", "C"]
    )
    assert not result.fits_in_host_memory
    assert result.hosted_experts == 3
    assert any("exceeds toy's host memory" in warning for warning in result.warnings)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"expert_bytes": 4 * UNIT}, "larger than one device group"),
        ({"expert_bytes": {"A": UNIT}}, "no size given for expert(s) ['B']"),
        ({"expert_bytes": 0}, "positive byte counts"),
        ({"expert_bytes": UNIT, "pinned": ["P", "Q", "R", "S"]}, "pinned expert 'S'"),
        ({"expert_bytes": UNIT, "tokens_per_s": -1.0}, "tokens_per_s must be positive"),
    ],
)
def test_simulation_errors_name_the_problem(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SimulationError) as error:
        simulate(requests("A B"), toy(), "lru", **kwargs)
    assert message in str(error.value)


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="'mru'"):
        simulate(requests("A"), toy(), "mru", expert_bytes=UNIT)


# --- the paper's comparison, from first principles -----------------------------------------


def test_paper_switch_ratios_follow_from_the_profiles() -> None:
    report = paper_comparison(n_requests=400)
    sn40l = load_profile("sn40l")
    assert sn40l.node_host_to_device_gb_per_s is not None
    # Derived here from the profile numbers, not copied from the simulator.
    sn40l_gb_s = min(
        sn40l.expert_shards * sn40l.device.host_link_gb_per_s, sn40l.node_host_to_device_gb_per_s
    )
    expert_bytes = 7e9 * 2
    for name, paper in PAPER_SWITCH_SPEEDUP.items():
        dgx = load_profile(name)
        expected = sn40l_gb_s / (dgx.expert_shards * dgx.device.host_link_gb_per_s)
        ratio = report["ratios"][name]
        assert ratio["per_switch"] == pytest.approx(expected)
        # The paper states "> 1 TB/s" and whole-number speedups, i.e. the ratio rounded
        # down: ours must lie in [paper, paper + 1).
        assert paper <= ratio["per_switch"] < paper + 1
        assert report["profiles"][name]["per_switch_s"] == pytest.approx(
            expert_bytes / (dgx.device.host_link_gb_per_s * GB)
        )
        # Trace ratio = per-switch ratio x switch-count ratio (capacities differ).
        runs = report["profiles"]
        counts = runs[name]["switches"] / runs["sn40l"]["switches"]
        assert ratio["trace_switch_seconds"] == pytest.approx(ratio["per_switch"] * counts)
        # Spreading each expert over all 8 GPUs would use 8 links at once.
        assert ratio["all_links"]["per_switch"] == pytest.approx(expected / dgx.devices)


def test_paper_capacities_and_spill() -> None:
    report = paper_comparison(n_requests=200)
    profiles = report["profiles"]
    # SN40L: one group of 8 sockets x 64 GB = 512 GB -> 36 experts of 14 GB;
    # DGX: 8 GPUs x floor(80 / 14) = 40 experts.
    sn40l, h100 = load_profile("sn40l"), load_profile("dgx-h100")
    assert profiles["sn40l"]["hbm_capacity_experts"] == int(
        sn40l.devices * sn40l.device.hbm_gb // 14
    )
    assert profiles["dgx-h100"]["hbm_capacity_experts"] == h100.devices * int(
        h100.device.hbm_gb // 14
    )
    # 150 x 14 GB = 2.1 TB fits the SN40L's 12 TB of DDR but not a DGX's 2 TB of host DRAM.
    assert profiles["sn40l"]["fits_in_host_memory"]
    for name in ("dgx-h100", "dgx-a100"):
        assert not profiles[name]["fits_in_host_memory"]
        assert any("host memory" in warning for warning in profiles[name]["warnings"])


# --- profiles ---------------------------------------------------------------------------------


def test_shipped_profiles_load_and_cite_every_number() -> None:
    names = available_profiles()
    assert {"sn40l", "dgx-h100", "dgx-a100", "this-machine"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert set(profile.numbers_needing_sources()) <= set(profile.sources)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"expert_shards": 3, "devices": 8}, "expert_shards (3) must divide devices (8)"),
        ({"device.hbm_gb": -1}, "device.hbm_gb"),
        ({"device.host_link_gb_per_s": 0}, "(got 0)"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
        ({"name": "Bad Name"}, "'Bad Name'"),
        ({"sources": {}}, "sources has no citation for"),
        ({"hbm_reserved_gb": 3}, "hbm_reserved_gb (3.0) leaves no room"),
    ],
)
def test_profile_validation_names_the_bad_value(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ProfileError) as error:
        parse_profile(profile_data(**overrides), "toy.yaml")
    assert fragment in str(error.value)
    assert "toy.yaml" in str(error.value)


def test_profile_is_frozen() -> None:
    with pytest.raises(ValueError):
        toy().devices = 2  # type: ignore[misc]


def test_profile_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        load_profile("nope")
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n", encoding="utf-8")
    with pytest.raises(ProfileError, match="must be a mapping, got list"):
        load_profile(listed)


def test_measured_profile_round_trips(tmp_path: Path) -> None:
    measured = measure_this_machine(size_mib=4, repeats=1)
    assert measured.device.host_link_gb_per_s > 0
    assert measured.host_memory_gb > measured.device.hbm_gb
    path = write_profile(measured, tmp_path / "m.yaml", header="measured\nin a test")
    assert path.read_text(encoding="utf-8").startswith("# measured\n# in a test\n")
    assert load_profile(path) == measured


# --- traces -----------------------------------------------------------------------------------


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


# --- command line -----------------------------------------------------------------------------


def test_cli_generate_replay_and_paper(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    assert main(["generate", "--out", str(trace), "--experts", "10", "--requests", "50"]) == 0
    out = tmp_path / "replay.json"
    argv = ["replay", "--trace", str(trace), "--profile", "dgx-h100", "--expert-gb", "14"]
    assert main([*argv, "--policy", "lfu", "--json", str(out)]) == 0
    replay = json.loads(out.read_text())
    assert replay["requests"] == 50 and replay["policy"] == "lfu"
    assert replay["hits"] + replay["switches"] == 50
    paper = tmp_path / "paper.json"
    assert main(["paper", "--requests", "100", "--json", str(paper)]) == 0
    assert set(json.loads(paper.read_text())["ratios"]) == {"dgx-h100", "dgx-a100"}
    assert main(["replay", "--trace", str(tmp_path / "none.csv"), "--profile", "sn40l"]) == 2
    assert "cannot read trace" in capsys.readouterr().err
