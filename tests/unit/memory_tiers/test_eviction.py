"""Eviction policies against hand-worked access sequences."""

from __future__ import annotations

import pytest

from memory_tiers.eviction import POLICY_NAMES, CostAwarePolicy, EvictionPolicy, make_policy


def _replay(policy: EvictionPolicy, accesses: list[tuple[str, float]]) -> None:
    for expert, now in accesses:
        policy.on_access(expert, now)


def test_make_policy_builds_every_named_policy() -> None:
    for name in POLICY_NAMES:
        policy = make_policy(name)
        assert policy.name == name
        assert isinstance(policy, EvictionPolicy)


def test_unknown_policy_names_the_bad_name_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'fifo'.*lru, lfu, cost_aware"):
        make_policy("fifo")


def test_lru_evicts_least_recently_used_first() -> None:
    policy = make_policy("lru")
    _replay(policy, [("a", 1), ("b", 2), ("c", 3), ("a", 4)])
    assert policy.victim_order(["a", "b", "c"], {}, {}, now=5) == ["b", "c", "a"]
    policy.on_access("b", 6)
    assert policy.victim_order(["a", "b", "c"], {}, {}, now=7) == ["c", "a", "b"]


def test_lru_only_orders_the_candidates_it_is_given() -> None:
    policy = make_policy("lru")
    _replay(policy, [("a", 1), ("b", 2), ("c", 3)])
    assert policy.victim_order(["c", "b"], {}, {}, now=4) == ["b", "c"]


def test_lfu_evicts_least_frequent_first_and_breaks_ties_by_recency() -> None:
    policy = make_policy("lfu")
    _replay(policy, [("a", 1), ("a", 2), ("b", 3), ("c", 4), ("c", 5), ("c", 6), ("d", 7)])
    # counts: a=2, b=1, c=3, d=1; b and d tie, b was used longer ago.
    assert policy.victim_order(["a", "b", "c", "d"], {}, {}, now=8) == ["b", "d", "a", "c"]


def test_lfu_forgets_counts_of_evicted_experts() -> None:
    policy = make_policy("lfu")
    _replay(policy, [("a", 1), ("a", 2), ("c", 3), ("c", 4), ("c", 5)])
    policy.on_evict("c")
    policy.on_access("c", 6)  # re-admitted: count restarts at 1
    assert policy.victim_order(["a", "c"], {}, {}, now=7) == ["c", "a"]


def test_cost_aware_scores_decayed_frequency_times_reload_per_byte() -> None:
    policy = CostAwarePolicy(half_life_s=10.0)
    _replay(policy, [("a", 0.0), ("a", 10.0), ("b", 20.0)])
    # a: (1 * 0.5 + 1) at t=10, halved again by t=20 -> 0.75; b: 1.0 at t=20.
    assert policy.frequency("a", 20.0) == pytest.approx(0.75)
    assert policy.frequency("b", 20.0) == pytest.approx(1.0)
    sizes = {"a": 100, "b": 100}
    same_cost = {"a": 1.0, "b": 1.0}
    assert policy.victim_order(["a", "b"], sizes, same_cost, now=20.0) == ["a", "b"]
    # a is twice as expensive to bring back: 0.75 * 2 > 1.0 * 1, so b goes first.
    a_costly = {"a": 2.0, "b": 1.0}
    assert policy.victim_order(["a", "b"], sizes, a_costly, now=20.0) == ["b", "a"]


def test_cost_aware_evicts_big_cheap_experts_before_small_ones() -> None:
    policy = CostAwarePolicy(half_life_s=10.0)
    _replay(policy, [("small", 1.0), ("big", 1.0)])
    sizes = {"small": 100, "big": 1000}
    reload = {"small": 1.0, "big": 1.0}  # same reload time, ten times the bytes
    assert policy.victim_order(["small", "big"], sizes, reload, now=1.0) == ["big", "small"]


def test_cost_aware_remembers_frequency_across_eviction() -> None:
    policy = CostAwarePolicy(half_life_s=100.0)
    _replay(policy, [("hot", 0.0), ("hot", 1.0), ("hot", 2.0), ("cold", 3.0)])
    policy.on_evict("hot")
    policy.on_access("hot", 4.0)
    sizes = {"hot": 10, "cold": 10}
    reload = {"hot": 1.0, "cold": 1.0}
    assert policy.victim_order(["hot", "cold"], sizes, reload, now=5.0) == ["cold", "hot"]


def test_cost_aware_refuses_candidates_without_sizes_or_reload_times() -> None:
    policy = make_policy("cost_aware")
    policy.on_access("a", 0.0)
    with pytest.raises(ValueError, match=r"missing for \['a'\]"):
        policy.victim_order(["a"], {"a": 10}, {}, now=1.0)


def test_cost_aware_rejects_a_bad_half_life() -> None:
    with pytest.raises(ValueError, match="half_life_s"):
        CostAwarePolicy(half_life_s=0.0)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_returns_a_permutation_of_the_candidates(name: str) -> None:
    policy = make_policy(name)
    _replay(policy, [("x", 1.0), ("y", 2.0)])
    candidates = ["x", "y", "never-seen"]
    sizes = dict.fromkeys(candidates, 10)
    reload = dict.fromkeys(candidates, 0.5)
    order = policy.victim_order(candidates, sizes, reload, now=3.0)
    assert sorted(order) == sorted(candidates)
    assert order[0] == "never-seen"
