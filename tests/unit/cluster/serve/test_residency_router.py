"""The executors' request router: where a GPU holds the expert, go there."""

from __future__ import annotations

import pytest

from cluster.serve.residency_router import rank_by_residency, two_choices


def test_an_executor_whose_gpu_holds_the_expert_and_has_it_loaded_comes_first() -> None:
    stats = {
        "on-gpu0": {"device": "gpu0", "resident": ["a", "b"]},
        "on-gpu1": {"device": "gpu1", "resident": ["c"]},
        "also-gpu0": {"device": "gpu0", "resident": ["a", "b"]},
    }
    assert rank_by_residency("a", stats, loaded={"also-gpu0", "on-gpu1"}) == ["also-gpu0"]
    # Nobody on gpu0 has it loaded yet: the bytes outweigh the engine state.
    assert rank_by_residency("b", stats, loaded={"on-gpu1"}) == ["on-gpu0", "also-gpu0"]
    assert rank_by_residency("c", stats, loaded=set()) == ["on-gpu1"]


def test_no_gpu_holds_it_or_no_stats_yet_leaves_the_choice_to_serve() -> None:
    stats = {"x": {"device": "gpu0", "resident": ["a"]}, "y": {}}
    assert rank_by_residency("z", stats, loaded={"x"}) == []
    assert rank_by_residency("a", {"y": {}}, loaded={"y"}) == []


def test_on_one_device_the_choice_is_serves_multiplexed_one() -> None:
    """A CPU node: every executor reports the same residents, so only "loaded" ranks."""
    same = {"device": "host0", "resident": ["a"]}
    stats = {"x": same, "y": same, "z": same}
    assert rank_by_residency("a", stats, loaded={"y"}) == ["y"]


@pytest.mark.parametrize("count", [1, 2, 5])
def test_two_distinct_choices_at_most(count: int) -> None:
    candidates = [f"r{i}" for i in range(count)]
    chosen = two_choices(candidates)
    assert len(chosen) == min(2, count) and len(set(chosen)) == len(chosen)
    assert set(chosen) <= set(candidates)
