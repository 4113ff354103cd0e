"""The tier simulator's model against hand-worked traces (no Ray, no data files)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.tier_sim.profiles import GB
from benchmarks.tier_sim.simulator import SimulationError, hbm_capacity_experts, simulate
from benchmarks.tier_sim.trace import Request
from memory_tiers.eviction import make_policy
from tests.unit.benchmarks.tier_sim.toy_profile import UNIT, toy


def requests(experts: str, start: float = 0.0, step: float = 1.0) -> list[Request]:
    return [Request(start + i * step, name) for i, name in enumerate(experts.split())]


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
