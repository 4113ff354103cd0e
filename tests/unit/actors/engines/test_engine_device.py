"""Where an engine runs: a model it is given runs where that model's weights are (a
tiered model's weights are views into the host arena even when a GPU is visible); a
model it loads itself goes to CUDA when there is one. "CUDA available" is simulated
on this CPU-only machine: an input sent to `cuda` here fails, as a device mismatch
would on a GPU machine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.engines import transformers_engine
from actors.engines.base import BatchJob, GenerationRequest, StreamChunk
from actors.engines.transformers_engine import TransformersEngine
from memory_tiers.ddr import CheckpointSource
from memory_tiers.switch import ModelSkeleton

REQUEST = GenerationRequest((), 4, prompt="the quick", ignore_eos=True)


@pytest.fixture
def cuda_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch says a GPU is there (the engine must not act on it for a given model)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def _cpu_model(checkpoint: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(checkpoint), use_safetensors=True).eval()


def _pointers(model: Any) -> list[int]:
    return [parameter.data_ptr() for parameter in model.parameters()]


def _batch(engine: TransformersEngine, prompts: tuple[str, ...]) -> list[str]:
    collected: list[list[StreamChunk | BaseException]] = [[] for _ in prompts]
    jobs = [
        BatchJob(GenerationRequest((), 4, prompt=prompt, ignore_eos=True), items.append)
        for prompt, items in zip(prompts, collected, strict=True)
    ]
    engine.stream_batch(jobs)
    texts = []
    for items in collected:
        assert all(isinstance(item, StreamChunk) for item in items), items
        texts.append("".join(item.text for item in items if isinstance(item, StreamChunk)))
    return texts


def test_a_given_cpu_model_runs_on_cpu_when_cuda_is_available(
    tiny_checkpoint: Path, cuda_visible: None
) -> None:
    model = _cpu_model(tiny_checkpoint)
    before = _pointers(model)
    engine = TransformersEngine("tiny", tiny_checkpoint, model=model)
    assert torch.device(engine.device) == torch.device("cpu")
    assert engine.generate(REQUEST).completion_tokens == 4
    chunks = list(engine.stream(REQUEST))
    assert chunks[-1].completion_tokens == 4
    assert len(_batch(engine, ("the quick", "hello world"))) == 2
    assert engine.model is model
    assert _pointers(model) == before  # served where it was: not moved, not copied


def test_a_tiered_skeleton_runs_where_it_is_bound(
    tiny_checkpoint: Path, cuda_visible: None
) -> None:
    """An executor builds the engine over a meta-device skeleton and binds the expert's
    bytes later, per batch: the engine's device is whatever the views are on then."""
    buffer, index = CheckpointSource(tiny_checkpoint).build()
    skeleton = ModelSkeleton.from_checkpoint(tiny_checkpoint)
    engine = TransformersEngine("tiny", tiny_checkpoint, model=skeleton.model)
    assert torch.device(engine.device).type == "meta"
    skeleton.bind_buffer(buffer, index)
    assert torch.device(engine.device) == torch.device("cpu")
    reference = TransformersEngine("alone", tiny_checkpoint, device="cpu")
    assert engine.generate(REQUEST).text == reference.generate(REQUEST).text


def test_an_unbound_skeleton_is_refused_by_name(tiny_checkpoint: Path) -> None:
    skeleton = ModelSkeleton.from_checkpoint(tiny_checkpoint)
    engine = TransformersEngine("tiny", tiny_checkpoint, model=skeleton.model)
    with pytest.raises(RuntimeError, match=r"'tiny'.*not bound"):
        engine.generate(REQUEST)


def test_an_engine_loading_its_own_model_picks_cuda_when_available(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert transformers_engine.default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert transformers_engine.default_device() == "cpu"


class _Recording:
    """A loaded model that records where the engine sends it and stays on the CPU."""

    def __init__(self, model: Any, sent_to: list[str]) -> None:
        self.model = model
        self.sent_to = sent_to

    def to(self, device: str | torch.device) -> Any:
        self.sent_to.append(str(device))
        return self.model


def test_an_own_model_is_sent_to_cuda_when_available(
    tiny_checkpoint: Path, cuda_visible: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _cpu_model(tiny_checkpoint)
    sent_to: list[str] = []

    def from_pretrained(*args: Any, **kwargs: Any) -> _Recording:
        return _Recording(model, sent_to)

    monkeypatch.setattr(
        transformers_engine.AutoModelForCausalLM, "from_pretrained", from_pretrained
    )
    engine = TransformersEngine("tiny", tiny_checkpoint)
    assert sent_to == ["cuda"]
    # The stand-in stayed on the CPU, and the engine follows its model there.
    assert torch.device(engine.device) == torch.device("cpu")
    assert engine.generate(REQUEST).completion_tokens == 4


def test_an_explicit_device_is_where_an_own_model_goes(
    tiny_checkpoint: Path, cuda_visible: None
) -> None:
    engine = TransformersEngine("tiny", tiny_checkpoint, device="cpu")
    assert torch.device(engine.device) == torch.device("cpu")
    assert engine.generate(REQUEST).completion_tokens == 4


@pytest.fixture
def deepspeed_on_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """DeepSpeed as on a GPU machine: `init_inference` would move the model to cuda:0.
    Here it records the call and fails, so a test sees whether it was called."""
    import deepspeed

    from actors.engines import deepspeed_engine

    calls: list[Any] = []

    def init_inference(model: Any, **kwargs: Any) -> Any:
        calls.append(model)
        raise AssertionError("init_inference would move the model to cuda:0")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(deepspeed, "init_inference", init_inference)
    monkeypatch.setattr(deepspeed_engine, "init_inference_device", lambda: "cuda")
    yield calls


def test_deepspeed_serves_a_given_model_where_it_is(
    tiny_checkpoint: Path, deepspeed_on_cuda: list[Any]
) -> None:
    from actors.engines.deepspeed_engine import DeepSpeedEngine

    model = _cpu_model(tiny_checkpoint)
    before = _pointers(model)
    engine = DeepSpeedEngine("math-tutor", tiny_checkpoint, model=model)
    assert deepspeed_on_cuda == []  # never wrapped: it would leave the arena's views
    assert engine.kernel_injection is False
    assert engine.model is model and _pointers(model) == before
    assert torch.device(engine.device) == torch.device("cpu")
    assert engine.generate(REQUEST).completion_tokens == 4


def test_deepspeed_on_cpu_wraps_a_given_model_as_before(tiny_checkpoint: Path) -> None:
    """On the CPU `init_inference` keeps the model on the host and injects nothing."""
    from actors.engines.deepspeed_engine import DeepSpeedEngine
    from actors.engines.kernel_injection import PREPARED_MARK

    model = _cpu_model(tiny_checkpoint)
    before = _pointers(model)
    engine = DeepSpeedEngine("math-tutor", tiny_checkpoint, model=model)
    assert getattr(engine.model, PREPARED_MARK) is False
    assert engine.kernel_injection is False
    assert _pointers(engine.model) == before
    assert torch.device(engine.device) == torch.device("cpu")
    assert engine.generate(REQUEST).completion_tokens == 4


def test_generation_never_compiles_the_forward_pass(tiny_checkpoint: Path) -> None:
    """A compiled forward pass (CUDA graphs on a GPU) keeps the pointers of the weights
    it captured, so it would run the previous expert after a tier switch: every
    generation path asks transformers not to compile."""
    engine = TransformersEngine("tiny", tiny_checkpoint, device="cpu")
    real_generate = engine.model.generate
    seen: list[Any] = []

    def recording(**kwargs: Any) -> Any:
        seen.append(kwargs.get("disable_compile"))
        return real_generate(**kwargs)

    engine.model.generate = recording
    engine.generate(REQUEST)
    list(engine.stream(REQUEST))
    _batch(engine, ("the quick", "hello world"))
    assert seen and all(flag is True for flag in seen), seen
    assert len(seen) >= 3  # one call per path at least: none went around the kwargs
