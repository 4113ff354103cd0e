"""One arena per GPU, owned by the placement service, on a fake device.

With `tiers.device: cuda` the placement service allocates the arena on the GPU Ray
gave it and copies experts into it; executors map that memory (CUDA IPC) and only
rebind. A "fake" device stands in for the GPU here: device-style arena, shared by
the same `ArenaShare` interface, CPU memory. What needs a real GPU (the IPC mapping
itself, the pinned staging copy) runs in benchmarks/device_check.sh.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.engines.kernel_injection import shared_skeleton
from actors.weights.tiered_weights import TieredWeights
from cluster.config import ConfigError, parse_config
from cluster.serve.placement_client import attach_arena
from cluster.serve.placement_replica import PlacementReplica
from memory_tiers.ddr import InProcessObjectStore, expert_source
from memory_tiers.errors import SourceChanged, UnknownDevice
from memory_tiers.packing import TensorIndex
from tests.unit.cluster.serve.test_placement_replica import NAMES, _checkpoint, _config_data

TOKENS = torch.tensor([[1, 5, 9, 2, 7]])
GPU_DEVICE = "gpu0"


def _gpu_config(tmp_path: Path) -> dict[str, Any]:
    data = _config_data(tmp_path, torn=False)
    data["tiers"].update(device="cuda", hbm_budget_bytes=data["tiers"]["hbm_budget_bytes"] // 3 * 2)
    data["tiers"].pop("cpu_binding")
    data["executors"] = {"enabled": True, "num_gpus": 0.25}
    return data


def _replica(tmp_path: Path, gpus: list[Any] | None = None, gpu_count: int = 1) -> PlacementReplica:
    checkpoints = {name: tmp_path / name for name in NAMES}
    for seed, name in enumerate(NAMES):
        if not checkpoints[name].exists():
            _checkpoint(checkpoints[name], seed)
    replica = PlacementReplica()
    replica.new_store = InProcessObjectStore
    replica.arena_id = lambda: "0123456789ab"
    replica.gpu_ids = lambda: ["3"] if gpus is None else gpus
    replica.gpu_arena = "fake"
    replica.gpu_count = lambda: gpu_count
    replica.reconfigure(
        {
            "config": _gpu_config(tmp_path),
            "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        }
    )
    return replica


class Executor:
    """What one executor process does with the tiers: its own skeleton, the device
    arena mapped from what the placement service describes, a grant per batch."""

    def __init__(
        self, replica: PlacementReplica, expert: str, checkpoint: Path, device: str = GPU_DEVICE
    ) -> None:
        self.replica = replica
        self.device = device
        self.source = expert_source(checkpoint, "float32")
        described = replica.describe(expert, self.source, device)
        self.weights = TieredWeights(
            expert,
            TensorIndex.from_json(described["index"]),
            attach_arena(described),
            shared_skeleton(checkpoint, "float32", "transformers"),
        )

    def logits(self) -> tuple[torch.Tensor, bool]:
        async def run() -> tuple[torch.Tensor, bool]:
            grant = await self.replica.acquire(
                self.weights.expert, "", None, self.source, self.device
            )
            try:
                self.weights.bind(grant)
                with torch.inference_mode():
                    return self.weights.model(TOKENS).logits, grant.lease.needs_copy
            finally:
                self.replica.release(grant)

        return asyncio.run(run())


def _reference(checkpoint: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    with torch.inference_mode():
        return model(TOKENS).logits


def test_two_executors_on_one_gpu_read_the_bytes_the_placement_service_copied(
    tmp_path: Path,
) -> None:
    replica = _replica(tmp_path)
    described = replica.describe("a")
    assert described["device"] == GPU_DEVICE
    assert described["arena_path"] is None  # no host file: the arena is device memory
    assert described["arena"].kind == "fake"
    first = Executor(replica, "a", tmp_path / "a")
    second = Executor(replica, "a", tmp_path / "a")
    reference = _reference(tmp_path / "a")

    logits, copied = first.logits()
    assert copied  # the placement service switched it in
    torch.testing.assert_close(logits, reference)
    # The second executor was never part of that copy: it is told the expert is
    # resident, and the memory it maps holds the expert's bytes, not its own garbage.
    logits, copied = second.logits()
    assert not copied
    torch.testing.assert_close(logits, reference)
    pointers = {
        executor.weights.model.get_input_embeddings().weight.data_ptr()
        for executor in (first, second)
    }
    assert len(pointers) == 1  # one copy of the bytes, mapped twice


def test_a_switch_on_the_gpu_replaces_an_evicted_expert_for_every_executor(
    tmp_path: Path,
) -> None:
    """Room for two: a third expert evicts the least recent, and an executor bound to
    the evicted one rebinds to its new region when it comes back."""
    replica = _replica(tmp_path)
    executors = {name: Executor(replica, name, tmp_path / name) for name in NAMES}
    references = {name: _reference(tmp_path / name) for name in NAMES}
    for name in ("a", "b", "c", "a"):
        logits, _ = executors[name].logits()
        torch.testing.assert_close(logits, references[name])
    metrics = replica.metrics()["devices"][GPU_DEVICE]
    assert metrics["evictions"] >= 2


def test_a_restarted_placement_service_hands_out_a_new_gpu_arena(tmp_path: Path) -> None:
    """A GPU arena dies with its owner; the next incarnation allocates a new one, and an
    executor maps it from the grant before binding (nothing of the old one is reused)."""
    replica = _replica(tmp_path)
    executor = Executor(replica, "b", tmp_path / "b")
    reference = _reference(tmp_path / "b")
    torch.testing.assert_close(executor.logits()[0], reference)
    old_arena = executor.weights.arena
    assert old_arena is not None

    executor.replica = _replica(tmp_path)  # the new incarnation
    logits, copied = executor.logits()
    assert copied
    torch.testing.assert_close(logits, reference)
    assert executor.weights.arena is not None
    assert executor.weights.arena.arena_id != old_arena.arena_id


def test_a_placement_service_without_a_gpu_says_which_setting_asks_for_one(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuntimeError, match="placement_num_gpus"):
        _replica(tmp_path, gpus=[])
    with pytest.raises(RuntimeError, match="torch sees no GPU"):
        _replica(tmp_path, gpu_count=0)


def _validate(tmp_path: Path, **changes: Any) -> None:
    data = _gpu_config(tmp_path)
    for section, values in changes.items():
        data[section].update(values)
    parse_config(data)


def test_gpu_tiers_need_executors_with_a_gpu_share(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "a", 0)
    _validate(tmp_path)  # the fixture's config is valid
    with pytest.raises(ConfigError, match=r"executors\.num_gpus > 0"):
        _validate(tmp_path, executors={"num_gpus": 0})
    with pytest.raises(ConfigError, match=r"needs tiers\.device 'cuda'"):
        _validate(tmp_path, tiers={"device": "cpu"})
    dedicated = {"dedicated": True}
    data = _gpu_config(tmp_path)
    data["experts"][0].update(dedicated)
    with pytest.raises(ConfigError, match=r"'a'.*ray_actor_options\.num_gpus > 0"):
        parse_config(data)
    data["experts"][0]["ray_actor_options"] = {"num_gpus": 0.25}
    parse_config(data)
    # A GPU share for a tiered expert whose bytes stay in host memory would be idle.
    data["tiers"]["device"] = "cpu"
    data["executors"]["num_gpus"] = 0
    with pytest.raises(ConfigError, match=r"'a'.*num_gpus needs tiers\.device 'cuda'"):
        parse_config(data)


def test_a_deepspeed_expert_on_gpu_tiers_is_packed_and_bound_injected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where its architecture can be injected, a DeepSpeed expert's bytes are packed in
    the injected layout (the placement service injects a private copy), its replicas
    agree on that source, and their skeleton is the injected module. The fake injector
    stands in for DeepSpeed's, whose kernels need CUDA; Llama itself is refused."""
    from actors.engines import kernel_injection
    from tests.unit.actors.engines.test_kernel_injection import fake_inject

    monkeypatch.setattr(kernel_injection, "injection_refusal", lambda config: None)
    monkeypatch.setattr(kernel_injection, "deepspeed_inject", fake_inject)
    for seed, name in enumerate(NAMES):
        _checkpoint(tmp_path / name, seed)
    data = _gpu_config(tmp_path)
    data["experts"][1]["engine"] = "deepspeed"
    replica = PlacementReplica()
    replica.new_store = InProcessObjectStore
    replica.arena_id = lambda: "0123456789ab"
    replica.gpu_ids = lambda: ["0"]
    replica.gpu_arena = "fake"
    replica.gpu_count = lambda: 1
    replica.reconfigure(
        {"config": data, "checkpoints": {name: str(tmp_path / name) for name in NAMES}}
    )
    checkpoint = tmp_path / "b"
    layout = kernel_injection.packed_layout("deepspeed", checkpoint, gpu=True)
    assert layout == kernel_injection.INJECTED_LAYOUT
    assert kernel_injection.packed_layout("transformers", checkpoint, gpu=True) == "plain"
    assert kernel_injection.packed_layout("deepspeed", checkpoint, gpu=False) == "plain"
    source = expert_source(checkpoint, "float32", layout)
    with pytest.raises(SourceChanged):  # a replica that would bind the plain layout
        replica.describe("b", expert_source(checkpoint, "float32"))
    described = replica.describe("b", source)
    index = TensorIndex.from_json(described["index"])
    assert any(entry.name.endswith("mlp.gate_up") for entry in index)
    weights = TieredWeights(
        "b",
        index,
        attach_arena(described),
        kernel_injection.shared_skeleton(checkpoint, "float32", "deepspeed", layout),
    )

    async def logits() -> torch.Tensor:
        grant = await replica.acquire("b", "", None, source)
        try:
            weights.bind(grant)
            with torch.inference_mode():
                return weights.model(TOKENS).logits
        finally:
            replica.release(grant)

    torch.testing.assert_close(asyncio.run(logits()), _reference(checkpoint), rtol=1e-5, atol=1e-5)
    # The transformers experts beside it keep the plain layout.
    plain = replica.describe("a", expert_source(tmp_path / "a", "float32"))
    plain_index = TensorIndex.from_json(plain["index"])
    assert any(entry.name.endswith("gate_proj.weight") for entry in plain_index)


def test_every_gpu_of_the_node_gets_its_arena_and_executors_use_their_own(
    tmp_path: Path,
) -> None:
    """Two GPUs: an arena (budget, slots, residents) on each; an executor takes grants
    on the device whose arena is on its GPU, found by the GPU's uuid."""
    replica = _replica(tmp_path, gpu_count=2)
    grants = replica._require()
    assert grants.devices == ["gpu0", "gpu1"]
    shares = {device: replica.describe("a", None, device)["arena"] for device in grants.devices}
    assert shares["gpu0"].arena_id != shares["gpu1"].arena_id
    assert replica.device_for(shares["gpu1"].device_uuid) == "gpu1"
    assert replica.device_for(None) == "gpu0"  # a replica without a GPU: the default
    with pytest.raises(UnknownDevice, match="placement service's node"):
        replica.device_for("GPU-on-another-node")

    reference = _reference(tmp_path / "a")
    on_first = Executor(replica, "a", tmp_path / "a", "gpu0")
    on_second = Executor(replica, "a", tmp_path / "a", "gpu1")
    for executor in (on_first, on_second):
        logits, copied = executor.logits()
        assert copied  # each GPU switches the expert into its own arena
        torch.testing.assert_close(logits, reference)
    residency = replica.residency()
    assert [r["expert"] for r in residency["gpu0"]["residents"]] == ["a"]
    assert [r["expert"] for r in residency["gpu1"]["residents"]] == ["a"]
    slots = replica.metrics()["slots_by_device"]
    assert slots["gpu0"]["acquisitions"] == 1 and slots["gpu1"]["acquisitions"] == 1
    assert replica.metrics()["slots"]["acquisitions"] == 2
    # A hint cannot know which GPU's executor will take the request: it copies nothing.
    assert asyncio.run(replica.prefetch("b")) is False
