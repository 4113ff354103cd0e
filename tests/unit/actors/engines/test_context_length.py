"""A real tiny engine counts tokens: a prompt and token budget past the model's context
window are refused before generating, alone or in a batch whose other rows are answered."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from actors.engines.base import (
    BatchJob,
    ChatMessage,
    ContextLengthExceeded,
    GenerationRequest,
    StreamChunk,
)
from actors.engines.transformers_engine import TransformersEngine, context_length_of
from actors.expert_server import ExpertServer

PROMPT = "the quick brown fox"


def prompt_tokens(engine: TransformersEngine, request: GenerationRequest) -> int:
    engine.context_length = None  # count without the check
    try:
        return int(engine.encode_request(request)["input_ids"].shape[1])
    finally:
        engine.context_length = context_length_of(engine.model.config, engine.tokenizer)


def test_the_window_is_the_model_configs() -> None:
    config = SimpleNamespace(max_position_embeddings=2048)
    huge = SimpleNamespace(model_max_length=int(1e30))  # transformers' "unknown"
    assert context_length_of(config, huge) == 2048
    assert context_length_of(SimpleNamespace(), SimpleNamespace(model_max_length=512)) == 512
    assert context_length_of(SimpleNamespace(), huge) is None


def test_a_budget_past_the_window_is_refused_with_the_counts(
    tiny_engine: TransformersEngine,
) -> None:
    assert tiny_engine.context_length == 2048  # the tiny Llama's max_position_embeddings
    request = GenerationRequest((ChatMessage("user", PROMPT),), max_tokens=2048)
    tokens = prompt_tokens(tiny_engine, request)
    with pytest.raises(ContextLengthExceeded) as refused:
        tiny_engine.generate(request)
    error = refused.value
    assert (error.context_length, error.prompt_tokens, error.max_tokens) == (2048, tokens, 2048)
    assert str(error) == error.message
    assert error.message == (
        f"This model's maximum context length is 2048 tokens. However, you requested "
        f"{tokens + 2048} tokens ({tokens} in the messages, 2048 in the completion). "
        "Please reduce the length of the messages or completion."
    )
    assert not tiny_engine._slot.locked()
    # It crosses process boundaries (Serve pickles an expert's error) unchanged.
    assert pickle.loads(pickle.dumps(error)).message == error.message


def test_prompt_tokens_count_and_the_exact_fit_is_served(tiny_engine: TransformersEngine) -> None:
    fits = GenerationRequest((), 4, prompt=PROMPT, ignore_eos=True)
    tiny_engine.context_length = prompt_tokens(tiny_engine, fits) + 4
    assert tiny_engine.generate(fits).completion_tokens == 4
    longer = GenerationRequest((), 4, prompt=PROMPT + " jumps", ignore_eos=True)
    with pytest.raises(ContextLengthExceeded, match=r"in the prompt, 4 in the completion"):
        tiny_engine.generate(longer)
    with pytest.raises(ContextLengthExceeded):
        next(iter(tiny_engine.stream(GenerationRequest((), 5, prompt=PROMPT))))
    assert not tiny_engine._slot.locked()


class Row:
    """One batch job's emitted chunks, or the error that ended it."""

    def __init__(self, max_tokens: int, stream: bool) -> None:
        self.items: list[StreamChunk | BaseException] = []
        # Without ignore_eos the budget is not part of the batch key: these rows batch.
        request = GenerationRequest((), max_tokens, prompt=PROMPT)
        self.job = BatchJob(request, self.items.append, stream=stream)

    @property
    def answer(self) -> tuple[str, str | None]:
        text = "".join(item.text for item in self.items if isinstance(item, StreamChunk))
        last = self.items[-1]
        return text, last.finish_reason if isinstance(last, StreamChunk) else None


def test_in_a_batch_only_the_over_long_request_fails(tiny_engine: TransformersEngine) -> None:
    server = ExpertServer("tiny", tiny_engine)
    alone = [Row(6, stream=False), Row(5, stream=True)]
    server.run_batch([row.job for row in alone])
    rows = [Row(6, stream=False), Row(4000, stream=True), Row(5, stream=True)]
    server.run_batch([row.job for row in rows])
    first, long, last = rows
    assert first.answer == alone[0].answer and first.answer[1] is not None
    assert last.answer == alone[1].answer and last.answer[1] is not None
    assert len(long.items) == 1 and isinstance(long.items[0], ContextLengthExceeded)
    assert long.items[0].max_tokens == 4000
    assert not tiny_engine._slot.locked()
