"""Placement service: switches through leases, prefetch, pinning, loss, restart."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from memory_tiers import placement as placement_module
from memory_tiers.ddr import CallableSource, CheckpointSource, InProcessObjectStore, Packed
from memory_tiers.errors import (
    BudgetExceeded,
    ExpertTooLarge,
    PinnedOverBudget,
    SwitchFailed,
    TierConfigError,
    UnknownDevice,
)
from memory_tiers.hbm import Lease
from memory_tiers.packing import TensorEntry, TensorIndex, pack_module
from memory_tiers.placement import DeviceSpec, PlacementService, ResidencyReport
from memory_tiers.switch import ModelSkeleton
from memory_tiers.tier_stats import format_residency

PROMPT = torch.tensor([[5, 9, 2, 77, 31]])


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny matmuls are fastest on one thread, and a shared machine cannot spin two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CONFIG = LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _model(seed: int) -> Any:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIG)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model.eval()


def _source(seed: int) -> CallableSource:
    return CallableSource(lambda: pack_module(_model(seed)), f"seed {seed}")


def _logits(model: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(PROMPT).logits


class _Replica:
    """What an expert replica does: lease, rebind when the generation changed, run."""

    def __init__(self, service: PlacementService, device: str) -> None:
        self.service = service
        self.device = device
        self.skeleton = ModelSkeleton.from_config(CONFIG)
        self.rebinds = 0

    def answer(self, expert: str) -> torch.Tensor:
        lease = self.service.acquire(expert, self.device)
        try:
            if self.skeleton.bound_generation != lease.generation:
                view = self.service.arena(self.device).host_view(lease.region)
                self.skeleton.bind_buffer(view, self.service.index(expert), lease.generation)
                self.rebinds += 1
            return _logits(self.skeleton.model)
        finally:
            self.service.release(lease)


def _service(budget: int, policy: str = "lru", **kwargs: Any) -> PlacementService:
    return PlacementService([DeviceSpec("cpu0", budget)], InProcessObjectStore(), policy, **kwargs)


def _expert_bytes() -> int:
    return pack_module(_model(0))[1].total_bytes


@pytest.mark.parametrize("policy", ["lru", "lfu", "cost_aware"])
def test_twelve_experts_in_a_budget_of_three_answer_like_fully_resident(policy: str) -> None:
    nbytes = _expert_bytes()
    service = _service(3 * nbytes, policy)
    expected = {}
    for seed in range(12):
        model = _model(seed)
        expected[f"e{seed}"] = _logits(model)
        service.register(f"e{seed}", _source(seed), packed=pack_module(model))
    replica = _Replica(service, "cpu0")
    sequence = random.Random(7).choices(sorted(expected), k=60)
    for expert in sequence:
        assert torch.equal(replica.answer(expert), expected[expert]), expert
    device = service.metrics()["devices"]["cpu0"]
    assert device["hits"] + device["misses"] == len(sequence)
    assert device["evictions"] > 0 and device["misses"] > 12  # re-admissions happened
    assert device["switches"] == device["misses"]
    assert device["bytes_moved"] == device["switches"] * nbytes
    assert device["used_bytes"] <= 3 * nbytes


def test_two_acquires_of_the_same_expert_copy_once() -> None:
    class SlowStore(InProcessObjectStore):
        def get(self, ref: Any) -> np.ndarray:
            time.sleep(0.05)
            return super().get(ref)

    nbytes = _expert_bytes()
    service = PlacementService([DeviceSpec("cpu0", 2 * nbytes)], SlowStore())
    service.register("a", _source(1))
    leases: list[Lease] = []
    threads = [
        threading.Thread(target=lambda: leases.append(service.acquire("a", "cpu0")))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    device = service.metrics()["devices"]["cpu0"]
    assert device["switches"] == 1 and device["misses"] == 1 and device["hits"] == 3
    assert len({lease.generation for lease in leases}) == 1
    assert sum(lease.needs_copy for lease in leases) == 1
    view = service.arena("cpu0").host_view(leases[0].region)
    assert np.array_equal(view, service.ddr_buffer("a"))
    for lease in leases:
        service.release(lease)


def test_a_failed_copy_grants_no_lease_and_frees_the_region() -> None:
    def broken() -> Packed:
        raise OSError("disk gone")

    nbytes = _expert_bytes()
    store = InProcessObjectStore()
    service = PlacementService([DeviceSpec("cpu0", 2 * nbytes)], store)
    service.register("a", CallableSource(broken), packed=pack_module(_model(0)))
    store.lose(service.ddr_ref("a"))
    with pytest.raises(SwitchFailed, match="disk gone"):
        service.acquire("a", "cpu0")
    assert service.residency()["cpu0"].used_bytes == 0
    assert service.metrics()["devices"]["cpu0"]["failed_switches"] == 1


def test_prefetch_switches_ahead_and_never_evicts_in_use_or_pinned() -> None:
    nbytes = _expert_bytes()
    service = _service(2 * nbytes)
    for seed, name in enumerate(["a", "b", "c"]):
        service.register(name, _source(seed))
    assert service.prefetch("a", "cpu0") is True
    assert service.prefetch("a", "cpu0") is False  # already resident
    lease = service.acquire("a", "cpu0")
    assert not lease.needs_copy
    service.pin("b", "cpu0")
    assert service.prefetch("c", "cpu0") is False  # a in use, b pinned: a hint, no room
    assert sorted(r.expert for r in service.residency()["cpu0"].residents) == ["a", "b"]
    service.release(lease)
    assert service.prefetch("c", "cpu0") is True  # a is idle now and goes
    device = service.metrics()["devices"]["cpu0"]
    assert (device["prefetches"], device["hits"], device["misses"]) == (2, 1, 0)


def test_pinned_experts_never_leave_under_pressure() -> None:
    nbytes = _expert_bytes()
    service = _service(3 * nbytes, "lfu")
    for seed in range(6):
        service.register(f"e{seed}", _source(seed))
    service.pin("e0", "cpu0")
    replica = _Replica(service, "cpu0")
    for expert in random.Random(3).choices([f"e{i}" for i in range(1, 6)], k=30):
        replica.answer(expert)
        assert any(r.expert == "e0" and r.pinned for r in service.residency()["cpu0"].residents)
    service.unpin("e0", "cpu0")
    service.evict("e0", "cpu0")


def test_bad_config_is_a_clear_error_at_load() -> None:
    with pytest.raises(TierConfigError, match="'mru'"):
        _service(1 << 20, "mru")
    nbytes = _expert_bytes()
    service = _service(nbytes // 2)
    with pytest.raises(ExpertTooLarge, match=r"'big' needs \d+ bytes.*'cpu0'"):
        service.register("big", _source(0))
    assert service.experts() == [] and service.ddr.experts() == []
    service = _service(2 * nbytes)
    for seed in range(3):
        service.register(f"e{seed}", _source(seed))
    service.pin("e0", "cpu0")
    service.pin("e1", "cpu0")
    with pytest.raises(PinnedOverBudget, match="'e2'"):
        service.pin("e2", "cpu0")
    with pytest.raises(UnknownDevice, match="'gpu9'"):
        service.acquire("e0", "gpu9")
    with pytest.raises(TierConfigError, match="unique"):
        PlacementService([DeviceSpec("d", 1024), DeviceSpec("d", 1024)], InProcessObjectStore())


def test_a_lost_object_is_rebuilt_from_the_checkpoint_on_disk(tmp_path: Path) -> None:
    directory = tmp_path / "expert"
    model = _model(4)
    model.save_pretrained(str(directory), safe_serialization=True)
    expected = _logits(AutoModelForCausalLM.from_pretrained(str(directory)))
    store = InProcessObjectStore()
    source = CheckpointSource(directory)
    nbytes = _expert_bytes()
    service = PlacementService([DeviceSpec("cpu0", nbytes)], store)
    service.register("x", source)
    store.lose(service.ddr_ref("x"))
    replica = _Replica(service, "cpu0")
    assert torch.equal(replica.answer("x"), expected)
    assert service.metrics()["ddr"]["rebuilds"] == 1


def test_restart_restores_residency_from_replica_reports(tmp_path: Path) -> None:
    nbytes = _expert_bytes()
    spec = DeviceSpec("cpu0", 3 * nbytes, arena="file", arena_path=tmp_path / "cpu0.arena")
    models = {f"e{i}": _model(i) for i in range(4)}
    first = PlacementService([spec], InProcessObjectStore())
    for seed, (name, model) in enumerate(models.items()):
        first.register(name, _source(seed), packed=pack_module(model))
    replica = _Replica(first, "cpu0")
    for name in ["e0", "e1", "e2", "e3", "e1"]:
        replica.answer(name)
    held = first.acquire("e3", "cpu0")  # in flight across the restart
    first.pin("e1", "cpu0")
    before = first.residency()["cpu0"]
    reports = [
        ResidencyReport(r.expert, "cpu0", r.offset, r.nbytes, r.generation, pinned=r.pinned)
        for r in before.residents
    ]
    reports.append(
        ResidencyReport(
            "e3",
            "cpu0",
            held.region.offset,
            held.region.nbytes,
            held.generation,
            lease_ids=(held.lease_id,),
        )
    )
    reports.append(ResidencyReport("ghost", "cpu0", 0, 10, 1))
    first.close()
    del first

    second = PlacementService([spec], InProcessObjectStore())
    for seed, (name, model) in enumerate(models.items()):
        second.register(name, _source(seed), packed=pack_module(model))
    refused = second.restore_from_reports(reports)
    assert refused == ["'ghost' on 'cpu0' (generation 1): expert not registered"]
    after = second.residency()["cpu0"]
    assert [(r.expert, r.offset, r.generation, r.pinned) for r in after.residents] == [
        (r.expert, r.offset, r.generation, r.pinned) for r in before.residents
    ]
    second.release(held)  # the in-flight lease is honoured after the restart
    # The arena file kept the bytes: the next request is a hit, with the right answer.
    replica = _Replica(second, "cpu0")
    assert torch.equal(replica.answer("e3"), _logits(models["e3"]))
    device = second.metrics()["devices"]["cpu0"]
    assert device["hits"] == 1 and device["switches"] == 0
    fresh = second.acquire("e0", "cpu0")
    assert fresh.generation > max(r.generation for r in before.residents)
    second.release(fresh)
    second.close()


def test_acquire_async_runs_off_the_event_loop() -> None:
    import asyncio

    service = _service(2 * _expert_bytes())
    service.register("a", _source(0))

    async def scenario() -> Lease:
        return await service.acquire_async("a", "cpu0")

    lease = asyncio.run(scenario())
    assert lease.needs_copy
    service.release(lease)
    assert service.residency_json()["cpu0"]["residents"][0]["expert"] == "a"


def test_conflicting_reports_keep_the_newest_generation() -> None:
    nbytes = _expert_bytes()
    service = _service(3 * nbytes)
    service.register("a", _source(0))
    service.register("b", _source(1))
    refused = service.restore_from_reports(
        [
            ResidencyReport("a", "cpu0", 0, nbytes, generation=3),
            ResidencyReport("b", "cpu0", 0, nbytes, generation=5),  # same place, newer
            ResidencyReport("b", "cpu0", 0, nbytes, generation=5, lease_ids=(9,)),
        ]
    )
    assert len(refused) == 1 and refused[0].startswith("'a' on 'cpu0' (generation 3)")
    (resident,) = service.residency()["cpu0"].residents
    assert (resident.expert, resident.generation, resident.in_use) == ("b", 5, 1)
    text = format_residency(service.residency())
    assert "cpu0:" in text and "b" in text and "in use x1" in text


def _raw_source(seed: int, nbytes: int) -> CallableSource:
    """An expert that is just ``nbytes`` of seeded random bytes."""

    def build() -> Packed:
        data = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
        index = TensorIndex((TensorEntry("w", "uint8", (nbytes,), 0, nbytes),), nbytes)
        return data, index

    return CallableSource(build, f"random {seed}")


def test_concurrent_requests_never_see_bytes_overwritten_while_in_use() -> None:
    nbytes = 64 << 10
    service = _service(3 * nbytes, "lfu")
    experts = [f"e{i}" for i in range(8)]
    for seed, name in enumerate(experts):
        service.register(name, _raw_source(seed, nbytes))
    expected = {name: service.ddr_buffer(name).copy() for name in experts}
    arena = service.arena("cpu0")
    failures: list[str] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            name = rng.choice(experts)
            lease = service.acquire(name, "cpu0")  # waits while in-use experts fill the budget
            try:
                if rng.random() < 0.3:
                    service.prefetch(rng.choice(experts), "cpu0")
                if not np.array_equal(arena.host_view(lease.region), expected[name]):
                    failures.append(f"{name} generation {lease.generation}")
            finally:
                service.release(lease)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    device = service.metrics()["devices"]["cpu0"]
    assert device["evictions"] > 0 and device["used_bytes"] <= 3 * nbytes
    assert all(r.in_use == 0 for r in service.residency()["cpu0"].residents)


def test_a_request_waits_for_an_in_use_expert_to_make_room() -> None:
    nbytes = 64 << 10
    service = _service(nbytes + 100)  # room for one expert, never two
    service.register("a", _raw_source(1, nbytes))
    service.register("b", _raw_source(2, nbytes))
    held = service.acquire("a", "cpu0")
    got: list[Lease] = []
    waiter = threading.Thread(target=lambda: got.append(service.acquire("b", "cpu0")))
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive() and not got  # 'a' is in use: 'b' waits, it does not fail
    service.release(held)
    waiter.join(timeout=30)
    assert [lease.expert for lease in got] == ["b"]
    assert service.residency()["cpu0"].to_dict()["residents"][0]["expert"] == "b"
    service.release(got[0])


def test_waiting_for_room_ends_with_a_clear_error() -> None:
    nbytes = 64 << 10
    service = _service(nbytes + 100, room_wait_s=0.2)
    service.register("a", _raw_source(1, nbytes))
    service.register("b", _raw_source(2, nbytes))
    held = service.acquire("a", "cpu0")
    with pytest.raises(BudgetExceeded, match=r"'b'.*in use or pinned: \['a'\]"):
        service.acquire("b", "cpu0")
    # A prefetch is a hint: it never waits.
    assert service.prefetch("b", "cpu0") is False
    service.release(held)
    service.release(service.acquire("b", "cpu0"))


def test_room_held_by_pinned_experts_alone_fails_at_once() -> None:
    nbytes = 64 << 10
    service = _service(nbytes + 100, room_wait_s=60.0)
    service.register("a", _raw_source(1, nbytes))
    service.register("b", _raw_source(2, nbytes))
    service.pin("a", "cpu0")
    started = time.monotonic()
    with pytest.raises(BudgetExceeded):
        service.acquire("b", "cpu0")
    assert time.monotonic() - started < 30  # no wait for a release that cannot come


def test_a_wait_for_another_callers_copy_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy into a device arena can stall (a wedged GPU copy, a slow restore): the
    next caller for that expert gives up at the bound, its own lease given back."""
    nbytes = _expert_bytes()
    service = PlacementService(
        [DeviceSpec("gpu0", 2 * nbytes, arena="fake")], InProcessObjectStore(), room_wait_s=0.05
    )
    service.register("a", _source(0))
    stalled, resume = threading.Event(), threading.Event()
    real_copy = placement_module.copy_into

    def stalling_copy(destination: Any, source: Any) -> None:
        stalled.set()
        resume.wait(30)
        real_copy(destination, source)

    monkeypatch.setattr(placement_module, "copy_into", stalling_copy)
    copier: list[Lease] = []
    thread = threading.Thread(target=lambda: copier.append(service.acquire("a", "gpu0")))
    thread.start()
    assert stalled.wait(30)
    with pytest.raises(SwitchFailed, match=r"did not finish within 0\.05 s"):
        service.acquire("a", "gpu0")
    resident = service.residency()["gpu0"].residents[0]
    assert resident.in_use == 1  # only the stalled copier's lease
    resume.set()
    thread.join(30)
    assert copier and copier[0].needs_copy
    service.release(copier[0])
    lease = service.acquire("a", "gpu0")  # the copy finished: a hit
    assert not lease.needs_copy
    service.release(lease)
