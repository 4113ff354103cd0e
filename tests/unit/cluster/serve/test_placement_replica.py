"""The placement service's Serve wrapper without a cluster: what it builds and passes on.

The placement logic itself (grants, reports, dead holders) is tested against
`memory_tiers.grant_service.GrantService` in tests/unit/memory_tiers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ray.exceptions import ActorDiedError
from transformers import AutoModelForCausalLM, LlamaConfig

from cluster.config import parse_config
from cluster.serve.metrics import TierMetrics
from cluster.serve.placement_replica import PlacementReplica, actor_is_dead, arena_path
from memory_tiers.arena import DeviceArena
from memory_tiers.ddr import InProcessObjectStore, expert_source
from memory_tiers.errors import ExpertUnavailable, SourceChanged, UnknownExpert
from memory_tiers.packing import checkpoint_nbytes
from tests.unit.cluster.serve.test_metrics import FakeMetrics, tags

CONFIG = LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
NAMES = ("a", "b", "c")
ARENA_ID = "0123456789ab"


def _checkpoint(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(CONFIG).save_pretrained(str(directory))
    return directory


def _config_data(tmp_path: Path, torn: bool) -> dict[str, Any]:
    """Three experts whose checkpoints lie in `tmp_path`, with room for all three."""
    nbytes = checkpoint_nbytes(tmp_path / "a", "float32")
    return {
        "experts": [
            {"name": name, "checkpoint": str(tmp_path / name), "params_b": 0.001} for name in NAMES
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
            "cpu_binding": "arena_copy",  # the arena file is what these tests are about
        },
        "serve": {"app_name": "unit"},
    }


def _replica(tmp_path: Path, torn: bool = False, probe: Any = None) -> PlacementReplica:
    checkpoints = {name: _checkpoint(tmp_path / name, seed) for seed, name in enumerate(NAMES)}
    if torn:
        weights = checkpoints["c"] / "model.safetensors"
        with weights.open("r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
    replica = PlacementReplica()
    replica.new_store = InProcessObjectStore
    replica.arena_id = lambda: ARENA_ID
    if probe is not None:
        replica.holder_is_dead = probe
    replica.reconfigure(
        {
            "config": _config_data(tmp_path, torn),
            "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        }
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


def test_nothing_is_served_before_the_first_configuration() -> None:
    replica = PlacementReplica()
    assert replica.service is None
    with pytest.raises(RuntimeError, match="not been configured"):
        replica.describe("a")
    with pytest.raises(RuntimeError, match="not been configured"):
        replica.metrics()


def test_the_grant_service_gets_the_arena_file_and_tier_settings(tmp_path: Path) -> None:
    replica = _replica(tmp_path)
    grants = replica._require()
    assert replica.service is grants.placement
    assert grants.placement.experts() == ["a", "b", "c"]
    config = parse_config(_config_data(tmp_path, torn=False))
    assert grants.placement.arena_path("host0") == arena_path(config, ARENA_ID)
    assert grants.slots.slots == 2 and grants.placement.policy == "lru"
    assert not grants.restarted and grants.ready_at == 0.0
    assert replica.describe("a")["arena_path"] == str(arena_path(config, ARENA_ID))


def test_the_holder_probe_is_the_one_the_replica_was_given(tmp_path: Path) -> None:
    verdicts = _Verdicts()
    replica = _replica(tmp_path, probe=verdicts)

    async def scenario() -> None:
        lost = await replica.acquire("a", "replica-1", "contact-1")
        verdicts.dead.add("contact-1")
        assert await replica._require().reclaim_dead_holders() == 1
        assert verdicts.asked == ["contact-1"]
        assert replica.metrics()["reclaimed_grants"] == 1
        replica.release(lost)  # a late release of a reclaimed grant is harmless
        assert replica._require().slots.active == 0

    asyncio.run(scenario())


def test_releases_and_prefetches_export_the_tier_metrics(tmp_path: Path) -> None:
    replica = _replica(tmp_path)
    fake = FakeMetrics()
    replica.tier_metrics = TierMetrics(fake)

    async def scenario() -> None:
        replica.release(await replica.acquire("a"))
        assert await replica.prefetch("b") is True

    asyncio.run(scenario())
    events = fake.made["coe_tier_events"].values
    assert events[tags(device="host0", event="switch_in")] == 2.0
    assert events[tags(device="host0", event="prefetch")] == 1.0


def test_a_truncated_checkpoint_marks_only_its_expert(tmp_path: Path) -> None:
    replica = _replica(tmp_path, torn=True)
    assert replica._require().placement.experts() == ["a", "b"]
    reason = replica.metrics()["broken"]["c"]
    assert "expert 'c' is unavailable" in reason and str(tmp_path / "c") in reason
    assert f"its checkpoint {tmp_path / 'c'} could not be packed: " in reason
    with pytest.raises(ExpertUnavailable, match="could not be packed"):
        replica.describe("c")
    with pytest.raises(ExpertUnavailable, match="expert 'c'"):
        asyncio.run(replica.acquire("c", "r", None))
    assert asyncio.run(replica.prefetch("c")) is False
    assert replica._require().slots.active == 0
    assert replica.describe("a")["index"]


def test_a_later_configuration_packs_only_the_new_experts(tmp_path: Path) -> None:
    replica = _replica(tmp_path, torn=True)
    grants = replica._require()
    assert "c" in grants.broken
    fixed = _checkpoint(tmp_path / "c-fixed", 2)
    data = _config_data(tmp_path, torn=True)
    data["experts"][2]["checkpoint"] = str(fixed)
    checkpoints = {e["name"]: e["checkpoint"] for e in data["experts"]}
    replica.reconfigure({"config": data, "checkpoints": checkpoints})
    assert replica._require() is grants  # same arena, same incarnation
    assert grants.broken == {} and grants.placement.experts() == ["a", "b", "c"]


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


def test_grants_last_one_request_timeout_and_slot_waits_are_bounded(tmp_path: Path) -> None:
    replica = _replica(tmp_path)
    grants = replica._require()
    defaults = parse_config(_config_data(tmp_path, torn=False))
    assert grants.slots.wait_s == defaults.tiers.slot_wait_s
    assert grants.grant_lifetime_s == defaults.serve.request_timeout_s
    data = _config_data(tmp_path, torn=False)
    data["tiers"]["slot_wait_s"] = 7.0
    data["serve"]["request_timeout_s"] = 42.0
    checkpoints = {name: str(tmp_path / name) for name in NAMES}
    replica.reconfigure({"config": data, "checkpoints": checkpoints})
    assert grants.grant_lifetime_s == 42.0  # the request timeout applies at once

    async def scenario() -> None:
        before = time.time()
        grant = await replica.acquire("a", "replica-1", "contact-1")
        assert grant.expires_at is not None
        assert before + 42.0 <= grant.expires_at <= time.time() + 42.0
        assert replica.release(grant) is True

    asyncio.run(scenario())
    fresh = PlacementReplica()
    fresh.new_store = InProcessObjectStore
    fresh.arena_id = lambda: ARENA_ID
    (tmp_path / "second").mkdir()
    data["tiers"]["arena_dir"] = str(tmp_path / "second")
    fresh.reconfigure({"config": data, "checkpoints": checkpoints})
    assert fresh._require().slots.wait_s == 7.0


def test_arenas_of_stopped_clusters_go_at_start_and_ours_goes_after_a_clean_stop(
    tmp_path: Path,
) -> None:
    stale = tmp_path / "coe-unit-0000000000aa-host0.arena"
    stale.write_bytes(b"\0" * 64)  # a killed cluster's: nobody maps it
    live = DeviceArena.create_file(tmp_path / "coe-unit-0000000000bb-host0.arena", 4096)
    other_app = tmp_path / "coe-other-0000000000cc-host0.arena"
    other_app.write_bytes(b"\0" * 64)
    first = _replica(tmp_path)
    config = parse_config(_config_data(tmp_path, torn=False))
    ours = arena_path(config, ARENA_ID)
    assert first.arena_file == ours and ours.is_file()
    assert not stale.exists() and live.path is not None and live.path.exists()
    assert other_app.exists()
    # A restart in the same cluster finds the same file, with its residents.
    restarted = PlacementReplica()
    restarted.new_store = InProcessObjectStore
    restarted.arena_id = lambda: ARENA_ID
    checkpoints = {name: str(tmp_path / name) for name in NAMES}
    restarted.reconfigure({"config": _config_data(tmp_path, False), "checkpoints": checkpoints})
    assert restarted._require().restarted and restarted.arena_file == ours
    first.__del__()  # Serve stops one replica: the other still maps the arena
    assert ours.exists()
    restarted.__del__()
    assert not ours.exists()
    live.close()


def test_by_default_a_cpu_device_binds_experts_in_the_object_store(tmp_path: Path) -> None:
    """Zero-copy: no arena file, grants name the expert's DDR object, and the budget,
    leases and eviction still account for every byte."""
    checkpoints = {name: _checkpoint(tmp_path / name, seed) for seed, name in enumerate(NAMES)}
    data = _config_data(tmp_path, torn=False)
    del data["tiers"]["cpu_binding"]
    data["tiers"]["hbm_budget_bytes"] = checkpoint_nbytes(tmp_path / "a", "float32") + 4096
    replica = PlacementReplica()
    replica.new_store = InProcessObjectStore
    replica.arena_id = lambda: ARENA_ID
    replica.reconfigure(
        {"config": data, "checkpoints": {k: str(v) for k, v in checkpoints.items()}}
    )
    config = parse_config(data)
    assert not arena_path(config, ARENA_ID).exists()
    assert replica.describe("a")["arena_path"] is None

    async def two_switches() -> None:
        store = replica._require().placement.ddr.store
        first = await replica.acquire("a")
        assert first.source is not None
        assert np.array_equal(store.get(first.source), replica.service.ddr_buffer("a"))
        replica.release(first)
        second = await replica.acquire("b")  # room for one: "a" is evicted
        assert second.source is not None and second.lease.expert == "b"
        replica.release(second)

    asyncio.run(two_switches())
    device = replica.metrics()["devices"]["host0"]
    assert device["switches"] == 2 and device["evictions"] == 1
    assert [r["expert"] for r in replica.residency()["host0"]["residents"]] == ["b"]
    replica.__del__()


def _apply(replica: PlacementReplica, data: dict[str, Any]) -> None:
    checkpoints = {e["name"]: e["checkpoint"] for e in data["experts"]}
    replica.reconfigure({"config": data, "checkpoints": checkpoints})


def test_an_apply_that_changes_an_experts_checkpoint_or_dtype_repacks_it(tmp_path: Path) -> None:
    replica = _replica(tmp_path)
    grants = replica._require()
    old_a = expert_source(tmp_path / "a", "float32")
    held = asyncio.run(grants.acquire("a", "replica-1", "contact-1", old_a))  # in flight
    old_bytes = grants.placement.ddr_buffer("a").copy()

    data = _config_data(tmp_path, torn=False)
    data["experts"][0]["checkpoint"] = str(_checkpoint(tmp_path / "a-retrained", 7))
    data["experts"][1]["dtype"] = "bfloat16"
    _apply(replica, data)

    new_a = expert_source(tmp_path / "a-retrained", "float32")
    assert grants.source("a") == new_a
    assert grants.source("b") == expert_source(tmp_path / "b", "bfloat16")
    assert grants.source("c") == expert_source(tmp_path / "c", "float32")  # untouched
    assert replica._require() is grants  # same arena, same incarnation
    with pytest.raises(SourceChanged, match="being updated"):
        asyncio.run(grants.acquire("a", "replica-1", "contact-1", old_a))
    with pytest.raises(SourceChanged):
        grants.describe("a", old_a)

    async def fresh() -> Any:
        grant = await grants.acquire("a", "replica-2", "contact-2", new_a)
        grants.release(grant)
        return grant

    grant = asyncio.run(fresh())
    # The new bytes were switched in beside the old ones, still held by the old grant.
    assert grant.lease.needs_copy and grant.lease.generation != held.lease.generation
    arena = grants.placement.arena("host0")
    assert np.array_equal(arena.host_view(grant.lease.region), grants.placement.ddr_buffer("a"))
    assert not np.array_equal(
        arena.host_view(held.lease.region), arena.host_view(grant.lease.region)
    )
    assert np.array_equal(arena.host_view(held.lease.region), old_bytes)  # not overwritten
    assert grants.release(held) is True  # the old bytes go with their last grant
    cache = grants.placement._caches["host0"]
    cache.check_invariants()
    assert [r["expert"] for r in grants.residency()["host0"]["residents"]] == ["a"]


def test_an_apply_that_removes_an_expert_unregisters_and_unpins_it(tmp_path: Path) -> None:
    replica = _replica(tmp_path)
    grants = replica._require()
    grants.pin("b")
    stored = len(grants.placement.ddr.store)  # type: ignore[arg-type]
    data = _config_data(tmp_path, torn=False)
    data["experts"] = [e for e in data["experts"] if e["name"] != "b"]
    _apply(replica, data)
    assert grants.placement.experts() == ["a", "c"]
    assert "b" not in [r["expert"] for r in grants.residency()["host0"]["residents"]]
    assert len(grants.placement.ddr.store) == stored - 1  # type: ignore[arg-type]
    with pytest.raises(UnknownExpert):
        asyncio.run(grants.acquire("b", "replica-1", "contact-1"))
    # Added back later, it is packed again and served.
    _apply(replica, _config_data(tmp_path, torn=False))
    grant = asyncio.run(grants.acquire("b", "replica-1", "contact-1"))
    assert grants.release(grant) is True
