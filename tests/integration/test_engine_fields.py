"""vLLM's extra sampling fields and raw prompts on the real demo engine (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.engines.base import BatchJob, ChatMessage, GenerationRequest, StreamChunk
from actors.engines.transformers_engine import TransformersEngine
from actors.expert_server import ExpertServer

QUESTION = (ChatMessage("user", "What is the capital of France?"),)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(demo_checkpoints: dict[str, Path]) -> TransformersEngine:
    return TransformersEngine("generalist", demo_checkpoints["generalist"])


def test_ignore_eos_runs_to_max_tokens_in_generate_stream_and_batch(
    smollm2: TransformersEngine,
) -> None:
    natural = smollm2.generate(GenerationRequest(QUESTION, max_tokens=24))
    assert natural.completion_tokens < 24  # the answer would end by itself
    request = GenerationRequest(QUESTION, max_tokens=24, ignore_eos=True)
    result = smollm2.generate(request)
    assert (result.completion_tokens, result.finish_reason) == (24, "length")
    chunks = list(smollm2.stream(request))
    assert chunks[-1].completion_tokens == 24
    rows: list[list[StreamChunk]] = [[], []]
    smollm2.stream_batch([BatchJob(request, rows[0].append), BatchJob(request, rows[1].append)])
    assert [row[-1].completion_tokens for row in rows] == [24, 24]


def test_min_tokens_holds_back_the_end(smollm2: TransformersEngine) -> None:
    natural = smollm2.generate(GenerationRequest(QUESTION, max_tokens=30))
    held = smollm2.generate(
        GenerationRequest(QUESTION, max_tokens=30, min_tokens=natural.completion_tokens + 5)
    )
    assert held.completion_tokens >= natural.completion_tokens + 5


def test_top_k_one_and_min_p_one_sample_the_greedy_answer(smollm2: TransformersEngine) -> None:
    greedy = smollm2.generate(GenerationRequest(QUESTION, max_tokens=12)).text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        sampled = GenerationRequest(QUESTION, max_tokens=12, temperature=1.5, seed=3, **extra)
        assert smollm2.generate(sampled).text == greedy


def test_repetition_penalty_changes_a_repetitive_answer(smollm2: TransformersEngine) -> None:
    ask = (ChatMessage("user", "Write the word cat ten times, separated by spaces."),)
    plain = smollm2.generate(GenerationRequest(ask, max_tokens=20)).text
    penalised = smollm2.generate(GenerationRequest(ask, max_tokens=20, repetition_penalty=3.0))
    assert penalised.text != plain


def test_raw_prompt_is_continued_without_template_or_system_prompt(
    smollm2: TransformersEngine,
) -> None:
    server = ExpertServer("generalist", smollm2, system_prompt="Always answer in French.")
    request = GenerationRequest((), max_tokens=8, prompt=PROMPT)
    result = server.generate(request)
    assert result.prompt_tokens == len(smollm2.tokenizer(PROMPT)["input_ids"])
    assert "Paris" in result.text
    streamed = "".join(c.text for c in server.stream(request))
    assert streamed == result.text


def test_streamed_chunks_count_tokens_as_they_go(smollm2: TransformersEngine) -> None:
    chunks = list(smollm2.stream(GenerationRequest(QUESTION, max_tokens=16)))
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] > 0
    assert all(c.prompt_tokens == chunks[-1].prompt_tokens for c in chunks)
