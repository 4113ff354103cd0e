"""Engines on the real demo weights (no Ray): generation, streaming, stops, DeepSpeed parity."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from actors.engines.base import (
    BatchJob,
    Cancellation,
    ChatMessage,
    GenerationRequest,
    StreamChunk,
)
from actors.engines.deepspeed_engine import DeepSpeedEngine
from actors.engines.transformers_engine import TransformersEngine
from actors.expert_server import ExpertServer, make_engine
from actors.weights.checkpoint import CheckpointError

QUESTION = (ChatMessage("user", "What is the capital of France?"),)


@pytest.fixture(scope="module")
def smollm2(demo_checkpoints: dict[str, Path]) -> TransformersEngine:
    return TransformersEngine("generalist", demo_checkpoints["generalist"])


@pytest.fixture(scope="module")
def gemma(demo_checkpoints: dict[str, Path]) -> TransformersEngine:
    return TransformersEngine("storyteller", demo_checkpoints["storyteller"], chat_format="plain")


def test_generate_answers_and_counts_tokens(smollm2: TransformersEngine) -> None:
    result = smollm2.generate(GenerationRequest(QUESTION, max_tokens=20))
    assert "Paris" in result.text
    assert result.finish_reason == "stop"
    assert 0 < result.completion_tokens <= 20
    assert result.prompt_tokens > 5


def test_length_limit_is_reported(smollm2: TransformersEngine) -> None:
    result = smollm2.generate(GenerationRequest(QUESTION, max_tokens=2))
    assert result.completion_tokens == 2
    assert result.finish_reason == "length"


def test_stream_concatenates_to_generate(smollm2: TransformersEngine) -> None:
    request = GenerationRequest(QUESTION, max_tokens=20)
    chunks = list(smollm2.stream(request))
    assert chunks[-1].finish_reason is not None
    assert "".join(c.text for c in chunks) == smollm2.generate(request).text
    assert chunks[-1].completion_tokens == smollm2.generate(request).completion_tokens


def test_cancelled_stream_frees_the_slot(smollm2: TransformersEngine) -> None:
    cancellation = Cancellation()
    stream = smollm2.stream(GenerationRequest(QUESTION, max_tokens=200), cancellation)
    next(stream)
    stream.close()  # the consumer goes away mid-stream
    assert cancellation.cancelled
    assert not smollm2._slot.locked()
    assert "Paris" in smollm2.generate(GenerationRequest(QUESTION, max_tokens=12)).text


def test_stop_strings_end_the_text(smollm2: TransformersEngine) -> None:
    result = smollm2.generate(GenerationRequest(QUESTION, max_tokens=20, stop=("Paris",)))
    assert "Paris" not in result.text
    assert result.finish_reason == "stop"
    streamed = "".join(
        c.text for c in smollm2.stream(GenerationRequest(QUESTION, 20, stop=("Paris",)))
    )
    assert streamed == result.text


def test_seeded_sampling_is_reproducible(smollm2: TransformersEngine) -> None:
    request = GenerationRequest(QUESTION, max_tokens=12, temperature=0.9, seed=7)
    assert smollm2.generate(request).text == smollm2.generate(request).text


def _collector() -> tuple[list[StreamChunk], Callable[[StreamChunk | BaseException], None]]:
    chunks: list[StreamChunk] = []

    def emit(item: StreamChunk | BaseException) -> None:
        assert isinstance(item, StreamChunk), item
        chunks.append(item)

    return chunks, emit


def test_a_batch_answers_each_request_as_it_would_alone(smollm2: TransformersEngine) -> None:
    requests = [
        GenerationRequest(QUESTION, max_tokens=20, stop=("Paris",)),
        GenerationRequest((ChatMessage("user", "Write a haiku about rain."),), max_tokens=12),
        GenerationRequest((ChatMessage("user", "What is 12 plus 30? Explain."),), max_tokens=3),
        GenerationRequest(QUESTION, max_tokens=20),
    ]
    collected = [_collector() for _ in requests]
    jobs = [BatchJob(r, emit) for r, (_, emit) in zip(requests, collected, strict=True)]
    smollm2.stream_batch(jobs)
    for request, (chunks, _) in zip(requests, collected, strict=True):
        alone = smollm2.generate(request)
        last = chunks[-1]
        assert "".join(c.text for c in chunks) == alone.text
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
            alone.finish_reason,
            alone.prompt_tokens,
            alone.completion_tokens,
        )
        assert all(c.finish_reason is None for c in chunks[:-1])


def test_a_cancelled_row_stops_while_the_rest_of_its_batch_finishes(
    smollm2: TransformersEngine,
) -> None:
    leaving, staying = Cancellation(), Cancellation()
    gone: list[StreamChunk] = []

    def leave_after_first_chunk(item: StreamChunk | BaseException) -> None:
        assert isinstance(item, StreamChunk)
        gone.append(item)
        leaving.cancel()

    kept, emit = _collector()
    long = GenerationRequest((ChatMessage("user", "Tell me a long story."),), max_tokens=40)
    smollm2.stream_batch(
        [BatchJob(long, leave_after_first_chunk, leaving), BatchJob(long, emit, staying)]
    )
    assert gone[-1].completion_tokens < 10
    assert kept[-1].completion_tokens == 40 and kept[-1].finish_reason == "length"
    assert not smollm2._slot.locked()


def test_a_batch_with_two_sampling_settings_is_refused(smollm2: TransformersEngine) -> None:
    _, emit = _collector()
    hot = GenerationRequest(QUESTION, max_tokens=4, temperature=0.9)
    with pytest.raises(ValueError, match="one sampling setting"):
        smollm2.stream_batch([BatchJob(hot, emit), BatchJob(GenerationRequest(QUESTION, 4), emit)])


def test_deepspeed_engine_matches_transformers(
    smollm2: TransformersEngine, demo_checkpoints: dict[str, Path]
) -> None:
    deepspeed_engine = DeepSpeedEngine("math-tutor", demo_checkpoints["math-tutor"])
    request = GenerationRequest((ChatMessage("user", "What is 12 plus 30?"),), max_tokens=16)
    assert deepspeed_engine.generate(request).text == smollm2.generate(request).text
    assert deepspeed_engine.kernel_injection is False  # CPU: DeepSpeed has no fused op here


def test_base_model_plain_transcript_stops_at_next_turn(gemma: TransformersEngine) -> None:
    result = gemma.generate(GenerationRequest(QUESTION, max_tokens=40))
    assert result.text
    assert "User:" not in result.text and "Assistant:" not in result.text


def test_expert_server_adds_its_system_prompt(smollm2: TransformersEngine) -> None:
    server = ExpertServer("pirate", smollm2, system_prompt="Always answer in French.")
    seen: list[tuple[ChatMessage, ...]] = []
    original = smollm2.encode

    def spy(messages: tuple[ChatMessage, ...]):  # type: ignore[no-untyped-def]
        seen.append(messages)
        return original(messages)

    smollm2.encode = spy  # type: ignore[method-assign]
    try:
        server.generate(GenerationRequest(QUESTION, max_tokens=2))
        own = (ChatMessage("system", "Be brief."), *QUESTION)
        server.generate(GenerationRequest(own, max_tokens=2))
    finally:
        smollm2.encode = original  # type: ignore[method-assign]
    assert seen[0][0] == ChatMessage("system", "Always answer in French.")
    assert seen[1][0] == ChatMessage("system", "Be brief.")
    assert server.requests == 2


def test_broken_checkpoints_are_refused(tmp_path: Path, demo_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        TransformersEngine("x", tmp_path / "absent")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="safetensors"):
        TransformersEngine("x", tmp_path)
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("x", "vllm", demo_checkpoints["generalist"], "float32", "template")


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-40])
def test_vanishing_temperature_decodes_greedily(
    smollm2: TransformersEngine, temperature: float
) -> None:
    # Dividing the logits by such a temperature overflows; sampling's limit is greedy.
    request = GenerationRequest(QUESTION, max_tokens=6, temperature=temperature)
    assert (
        smollm2.generate(request).text
        == smollm2.generate(GenerationRequest(QUESTION, max_tokens=6)).text
    )


def test_a_stop_string_transformers_cannot_index_still_answers(
    smollm2: TransformersEngine,
) -> None:
    # No token ends in a lone surrogate, so transformers' stop-string criterion raises
    # ValueError while it is being built; the request must still be answered.
    request = GenerationRequest(QUESTION, max_tokens=8, stop=("\ud800",))
    assert smollm2._stop_criteria(request) == []
    result = smollm2.generate(request)
    assert result.text and result.completion_tokens == 8
    streamed = list(smollm2.stream(request))
    assert "".join(c.text for c in streamed) == result.text
