"""The placement service's Serve wrapper without Ray: dead holders and broken checkpoints."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from ray.exceptions import ActorDiedError
from transformers import AutoModelForCausalLM, LlamaConfig

import cluster.serve.placement_replica as placement_module
from actors.weights.tiered_weights import Grant
from cluster.serve.placement_replica import PlacementReplica, actor_is_dead
from memory_tiers.ddr import InProcessObjectStore
from memory_tiers.errors import ExpertUnavailable
from memory_tiers.packing import checkpoint_nbytes

CONFIG = LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _checkpoint(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(CONFIG).save_pretrained(str(directory))
    return directory


def _replica(tmp_path: Path, torn: bool = False) -> PlacementReplica:
    names = ["a", "b", "c"]
    checkpoints = {name: _checkpoint(tmp_path / name, seed) for seed, name in enumerate(names)}
    nbytes = checkpoint_nbytes(checkpoints["a"], "float32")
    if torn:
        weights = checkpoints["c"] / "model.safetensors"
        with weights.open("r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
    config = {
        "experts": [
            {"name": name, "checkpoint": str(checkpoints[name]), "params_b": 0.001}
            for name in names
        ],
        "categories": [{"name": "general", "examples": ["Hello"]}],
        "category_map": {"general": "a"},
        "generalist": "a",
        "tiers": {
            "enabled": True,
            "hbm_budget_bytes": 3 * nbytes + 4096,
            "active_slots": 2,
            "pinned": ["c"] if torn else [],
            "arena_dir": str(tmp_path),
        },
        "serve": {"app_name": "unit"},
    }
    replica = PlacementReplica()
    replica.new_store = InProcessObjectStore
    replica.reconfigure(
        {"config": config, "checkpoints": {k: str(v) for k, v in checkpoints.items()}}
    )
    return replica


class _Verdicts:
    """A liveness probe whose answers the test sets: contact -> dead?"""

    def __init__(self) -> None:
        self.dead: set[str] = set()
        self.asked: list[str] = []

    async def __call__(self, contact: Any) -> bool:
        self.asked.append(contact)
        return contact in self.dead


def test_a_dead_holders_lease_and_slot_are_reclaimed(tmp_path: Path) -> None:
    replica = _replica(tmp_path)
    verdicts = _Verdicts()
    replica.holder_is_dead = verdicts

    async def scenario() -> None:
        lost = await replica.acquire("a", "replica-1", "contact-1")
        kept = await replica.acquire("b", "replica-2", "contact-2")
        assert replica.slots.active == 2
        # Both slots taken: without reclaiming, a third request would wait for ever.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(replica.acquire("c", "replica-3", "contact-3"), 0.05)
        assert await replica.reclaim_dead_holders() == 0  # nobody died yet
        verdicts.dead.add("contact-1")
        assert await replica.reclaim_dead_holders() == 1
        metrics = replica.metrics()
        assert metrics["reclaimed_grants"] == 1 and metrics["outstanding_grants"] == 1
        in_use = {r["expert"]: r["in_use"] for r in replica.residency()["host0"]["residents"]}
        assert in_use == {"a": 0, "b": 1}
        third = await asyncio.wait_for(replica.acquire("c", "replica-3", "contact-3"), 5)
        replica.release(lost)  # a late release of a reclaimed grant is harmless
        replica.release(kept)
        replica.release(third)
        assert replica.slots.active == 0 and replica.metrics()["outstanding_grants"] == 0

    asyncio.run(scenario())


def test_the_watcher_reclaims_without_being_asked_and_stops_when_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(placement_module, "HOLDER_CHECK_INTERVAL_S", 0.01)
    replica = _replica(tmp_path)
    verdicts = _Verdicts()
    verdicts.dead.add("gone")
    replica.holder_is_dead = verdicts

    async def scenario() -> None:
        await replica.acquire("a", "replica-1", "gone")
        await replica.acquire("a", "replica-1", "gone")
        for _ in range(500):
            if replica.ledger.outstanding() == 0:
                break
            await asyncio.sleep(0.01)
        assert replica.ledger.reclaimed == 2 and replica.slots.active == 0
        assert replica._watcher is not None
        await asyncio.wait_for(replica._watcher, 1)  # nothing outstanding: it ends

    asyncio.run(scenario())


def test_grants_without_a_holder_are_not_tracked(tmp_path: Path) -> None:
    replica = _replica(tmp_path)

    async def scenario() -> Grant:
        return await replica.acquire("a")

    grant = asyncio.run(scenario())
    assert replica.ledger.outstanding() == 0
    replica.release(grant)
    assert replica.slots.active == 0


def test_a_truncated_checkpoint_marks_only_its_expert(tmp_path: Path) -> None:
    replica = _replica(tmp_path, torn=True)
    assert replica._require().experts() == ["a", "b"]
    reason = replica.metrics()["broken"]["c"]
    assert "expert 'c' is unavailable" in reason and str(tmp_path / "c") in reason
    with pytest.raises(ExpertUnavailable, match="could not be packed"):
        replica.describe("c")
    with pytest.raises(ExpertUnavailable, match="expert 'c'"):
        asyncio.run(replica.acquire("c", "r", None))
    assert asyncio.run(replica.prefetch("c")) is False
    assert replica.slots.active == 0
    assert replica.describe("a")["index"]


class _Contact:
    def __init__(self, outcome: BaseException | None) -> None:
        self.outcome = outcome
        self.__ray_ready__ = self

    def remote(self) -> Any:
        async def ready() -> bool:
            if self.outcome is not None:
                raise self.outcome
            return True

        return ready()


def test_only_rays_word_that_the_actor_died_counts_as_dead() -> None:
    assert asyncio.run(actor_is_dead(_Contact(ActorDiedError()))) is True
    assert asyncio.run(actor_is_dead(_Contact(None))) is False
    assert asyncio.run(actor_is_dead(_Contact(TimeoutError()))) is False
    assert asyncio.run(actor_is_dead(_Contact(RuntimeError("unreachable")))) is False
