"""Executors: many experts on shared skeletons, each answered with its own weights,
tokenizer and system prompt, exactly as if it were loaded alone."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from actors.engines.base import BatchJob, ChatMessage, GenerationRequest, StreamChunk
from actors.engines.transformers_engine import TransformersEngine
from actors.executor import ExecutorExpert, ExpertExecutor, ExpertSpec
from actors.expert_server import ExpertServer
from memory_tiers.arena import DeviceArena, Region
from memory_tiers.ddr import CheckpointSource
from memory_tiers.errors import BindError
from memory_tiers.grants import Grant
from memory_tiers.hbm import Lease
from memory_tiers.packing import TensorIndex
from memory_tiers.switch import copy_into
from tests.unit.actors.tiny_models import save_tiny_expert

PROMPTS = ("w1 w2 w3", "w40 w41")
_lease_ids = itertools.count(1)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Device:
    """An arena with each expert's packed bytes at a region of its own, and grants for
    them: what the placement service hands an executor, without the service."""

    def __init__(self, directories: dict[str, Path]) -> None:
        packed = {name: CheckpointSource(path).build() for name, path in directories.items()}
        total = sum(index.total_bytes + 4096 for _, index in packed.values())
        self.arena = DeviceArena.in_memory(total)
        self.indexes: dict[str, TensorIndex] = {}
        self.regions: dict[str, Region] = {}
        offset = 0
        for name, (buffer, index) in packed.items():
            region = Region(offset, index.total_bytes)
            copy_into(self.arena.host_view(region), buffer)
            self.indexes[name] = index
            self.regions[name] = region
            offset += (index.total_bytes + 4095) // 4096 * 4096

    def grant(self, expert: str, generation: int = 1) -> Grant:
        lease = Lease(next(_lease_ids), expert, "host0", self.regions[expert], generation, False)
        return Grant(lease=lease, slot=0, incarnation="one", slot_wait_s=0.0)


def _spec(name: str, directory: Path) -> ExpertSpec:
    return ExpertSpec(name=name, checkpoint_dir=directory, system_prompt=f"w{len(name) * 7}")


def _request(prompt: str) -> GenerationRequest:
    return GenerationRequest(messages=(ChatMessage(role="user", content=prompt),), max_tokens=6)


def _reference(spec: ExpertSpec, prompt: str) -> str:
    """The expert loaded alone with from_pretrained, its own system prompt, greedy."""
    server = ExpertServer(spec.name, TransformersEngine(spec.name, spec.checkpoint_dir), "")
    server.system_prompt = spec.system_prompt
    return server.generate(_request(prompt)).text


def _answer(executor: ExpertExecutor, expert: ExecutorExpert, grant: Grant, prompt: str) -> str:
    chunks: list[StreamChunk] = []
    job = BatchJob(request=_request(prompt), stream=False, emit=_collect(chunks))
    executor.run(expert, grant, [job])
    return "".join(chunk.text for chunk in chunks)


def _collect(chunks: list[StreamChunk]):  # type: ignore[no-untyped-def]
    def emit(item: object) -> None:
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, StreamChunk)
        chunks.append(item)

    return emit


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experts")
    return {
        "alpha": save_tiny_expert(root / "alpha", seed=1),
        "beta": save_tiny_expert(root / "beta", seed=2),
        "gamma": save_tiny_expert(root / "gamma", seed=3),
        "wide": save_tiny_expert(root / "wide", seed=4, hidden=96),
    }


def test_experts_of_one_architecture_share_a_skeleton_and_answer_as_if_alone(
    checkpoints: dict[str, Path],
) -> None:
    names = ["alpha", "beta", "gamma"]
    device = Device({name: checkpoints[name] for name in names})
    executor = ExpertExecutor(device.arena)
    specs = {name: _spec(name, checkpoints[name]) for name in names}
    experts = {name: executor.load(specs[name], device.indexes[name]) for name in names}
    assert len(executor.skeletons) == 1
    references = {(n, p): _reference(specs[n], p) for n in names for p in PROMPTS}
    assert len(set(references.values())) == len(references)  # a wrong expert would show
    # Interleaved, so every request finds the skeleton bound to another expert.
    for name, prompt in [(n, p) for p in PROMPTS for n in names] + [("alpha", PROMPTS[0])]:
        answer = _answer(executor, experts[name], device.grant(name), prompt)
        assert answer == references[(name, prompt)], (name, prompt)
    assert executor.rebinds == 7


def test_an_expert_of_another_architecture_gets_its_own_skeleton(
    checkpoints: dict[str, Path],
) -> None:
    names = ["alpha", "wide"]
    device = Device({name: checkpoints[name] for name in names})
    executor = ExpertExecutor(device.arena)
    specs = {name: _spec(name, checkpoints[name]) for name in names}
    experts = {name: executor.load(specs[name], device.indexes[name]) for name in names}
    assert len(executor.skeletons) == 2
    assert experts["alpha"].skeleton is not experts["wide"].skeleton
    # A tokenizer is never shared across skeletons, whose batches may run at once.
    assert experts["alpha"].server.engine.tokenizer is not experts["wide"].server.engine.tokenizer
    for name in names + names:
        answer = _answer(executor, experts[name], device.grant(name), PROMPTS[0])
        assert answer == _reference(specs[name], PROMPTS[0])
    # Each skeleton stays bound to its expert: the second round needed no rebind.
    assert executor.rebinds == 2
    bound = {report.expert for report, _ in executor.reports(in_use=set())}
    assert bound == {"alpha", "wide"}


def test_a_bind_happens_only_when_the_region_changed(checkpoints: dict[str, Path]) -> None:
    device = Device({"alpha": checkpoints["alpha"]})
    executor = ExpertExecutor(device.arena)
    expert = executor.load(_spec("alpha", checkpoints["alpha"]), device.indexes["alpha"])
    _answer(executor, expert, device.grant("alpha"), PROMPTS[0])
    _answer(executor, expert, device.grant("alpha"), PROMPTS[1])
    assert executor.rebinds == 1
    _answer(executor, expert, device.grant("alpha", generation=2), PROMPTS[1])
    assert executor.rebinds == 2  # re-admitted: the bytes may have moved


def test_each_expert_keeps_its_own_system_prompt_and_tokenizer(
    checkpoints: dict[str, Path],
) -> None:
    """Two experts on the same weights file and skeleton that differ only by system
    prompt: each request sees its own expert's prompt, never the other's."""
    device = Device({"one": checkpoints["alpha"], "two": checkpoints["alpha"]})
    executor = ExpertExecutor(device.arena)
    first = ExpertSpec(name="one", checkpoint_dir=checkpoints["alpha"], system_prompt="w100")
    second = ExpertSpec(name="two", checkpoint_dir=checkpoints["alpha"], system_prompt="w200")
    experts = {s.name: executor.load(s, device.indexes[s.name]) for s in (first, second)}
    # Same tokenizer files on one skeleton: one tokenizer, used under the skeleton's lock.
    assert experts["one"].server.engine.tokenizer is experts["two"].server.engine.tokenizer
    assert len(executor.tokenizers) == 1
    answers = {
        name: _answer(executor, experts[name], device.grant(name), PROMPTS[0])
        for name in ("one", "two", "one")
    }
    assert answers["one"] == _reference(first, PROMPTS[0])
    assert answers["two"] == _reference(second, PROMPTS[0])
    assert answers["one"] != answers["two"]


def test_a_lease_for_another_expert_is_refused(checkpoints: dict[str, Path]) -> None:
    device = Device({"alpha": checkpoints["alpha"], "beta": checkpoints["beta"]})
    executor = ExpertExecutor(device.arena)
    alpha = executor.load(_spec("alpha", checkpoints["alpha"]), device.indexes["alpha"])
    with pytest.raises(ValueError, match="lease for 'beta'"):
        _answer(executor, alpha, device.grant("beta"), PROMPTS[0])


def test_bytes_of_another_architecture_fail_at_load_naming_the_tensors(
    checkpoints: dict[str, Path],
) -> None:
    device = Device({"wide": checkpoints["wide"]})
    executor = ExpertExecutor(device.arena)
    with pytest.raises(BindError, match="mismatched"):
        executor.load(_spec("alpha", checkpoints["alpha"]), device.indexes["wide"])


def test_a_failed_bind_leaves_no_binding_that_looks_good(checkpoints: dict[str, Path]) -> None:
    device = Device({"alpha": checkpoints["alpha"]})
    executor = ExpertExecutor(device.arena)
    expert = executor.load(_spec("alpha", checkpoints["alpha"]), device.indexes["alpha"])
    _answer(executor, expert, device.grant("alpha"), PROMPTS[0])
    broken = TensorIndex(entries=(), total_bytes=0)
    expert.weights.index = broken
    with pytest.raises(BindError):
        _answer(executor, expert, device.grant("alpha", generation=5), PROMPTS[0])
    assert expert.skeleton.bound is None
    expert.weights.index = device.indexes["alpha"]
    answer = _answer(executor, expert, device.grant("alpha", generation=5), PROMPTS[0])
    assert answer == _reference(_spec("alpha", checkpoints["alpha"]), PROMPTS[0])


def test_zero_copy_binds_each_expert_straight_to_its_store_buffer(
    checkpoints: dict[str, Path],
) -> None:
    """A zero-copy device: no arena; each grant names the expert's DDR object, and the
    shared skeleton's tensors point into that read-only buffer itself."""
    from memory_tiers.ddr import InProcessObjectStore

    store = InProcessObjectStore()
    names = ["alpha", "beta"]
    packed = {name: CheckpointSource(checkpoints[name]).build() for name in names}
    refs = {name: store.put(buffer) for name, (buffer, _) in packed.items()}
    executor = ExpertExecutor(None, fetch=store.get)
    specs = {name: _spec(name, checkpoints[name]) for name in names}
    experts = {name: executor.load(specs[name], packed[name][1]) for name in names}

    def grant(name: str) -> Grant:
        region = Region(0, packed[name][1].total_bytes)
        lease = Lease(next(_lease_ids), name, "host0", region, 1, False)
        return Grant(lease=lease, slot=0, incarnation="one", slot_wait_s=0.0, source=refs[name])

    for name in names + names:
        answer = _answer(executor, experts[name], grant(name), PROMPTS[0])
        assert answer == _reference(specs[name], PROMPTS[0])
        buffer = store.get(refs[name])
        start = buffer.ctypes.data
        pointer = next(iter(experts[name].weights.model.parameters())).data_ptr()
        assert start <= pointer < start + buffer.nbytes  # bound in place, not copied
    assert executor.rebinds == 4  # one skeleton, the expert changes every time
    assert executor.reports(in_use=set()) == []  # nothing an arena could keep
