"""Stop strings end generation early at a cost linear in the generated text."""

from __future__ import annotations

from typing import cast

import pytest
import torch

from actors.engines.base import GenerationRequest
from actors.engines.stop_matching import StopStrings
from actors.engines.transformers_engine import TransformersEngine


class ByteTokenizer:
    """Tokens are byte strings, decoded as UTF-8 the way byte-level BPE decodes them;
    counts every token it decodes, and has no vocabulary to index."""

    def __init__(self, pieces: dict[int, bytes]) -> None:
        self.pieces = pieces
        self.decoded = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded += len(ids)
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    def get_vocab(self) -> dict[str, int]:
        raise AssertionError("the stop check must not index the vocabulary")


PIECES = {0: b"ab", 1: b"c", 2: b" ", 3: "é".encode()[:1], 4: "é".encode()[1:], 5: b"END"}


def check(criterion: StopStrings, rows: list[list[int]]) -> list[bool]:
    """One call as `generate` makes it: every row's ids so far (prompt included)."""
    input_ids = cast(torch.LongTensor, torch.tensor(rows))
    done = criterion(input_ids, cast(torch.FloatTensor, torch.zeros(len(rows), 6)))
    assert done.shape == (len(rows),)
    return [bool(flag) for flag in done.tolist()]


def run(criterion: StopStrings, prompt: list[int], tokens: list[int]) -> int | None:
    """Feed `tokens` one step at a time; the step (1-based) at which it stops, if any."""
    ids = list(prompt)
    for step, token in enumerate(tokens, start=1):
        ids.append(token)
        if check(criterion, [ids])[0]:
            return step
    return None


def test_a_stop_spanning_tokens_ends_at_the_token_that_completes_it() -> None:
    criterion = StopStrings(ByteTokenizer(PIECES), ("bc ab",), prompt_tokens=1)
    assert run(criterion, [5], [0, 0, 1, 2, 0, 1]) == 5


def test_a_stop_in_the_prompt_does_not_count() -> None:
    criterion = StopStrings(ByteTokenizer(PIECES), ("END",), prompt_tokens=2)
    assert run(criterion, [5, 5], [0, 1, 2, 0]) is None
    criterion = StopStrings(ByteTokenizer(PIECES), ("END",), prompt_tokens=2)
    assert run(criterion, [5, 5], [0, 5, 2]) == 2


def test_a_character_split_over_tokens_is_matched_whole() -> None:
    criterion = StopStrings(ByteTokenizer(PIECES), ("cé",), prompt_tokens=0)
    assert run(criterion, [], [0, 1, 3, 4, 2]) == 4


def test_the_prompt_length_is_learned_from_the_first_step_when_not_given() -> None:
    criterion = StopStrings(ByteTokenizer(PIECES), ("END",))
    assert run(criterion, [5, 5, 5], [0, 1, 5]) == 3


def test_each_row_of_a_batch_stops_on_its_own() -> None:
    criterion = StopStrings(ByteTokenizer(PIECES), ("c",), prompt_tokens=1)
    assert check(criterion, [[5, 0], [5, 1]]) == [False, True]


def test_the_cost_is_linear_in_the_generated_tokens_whatever_the_stop() -> None:
    tokenizer = ByteTokenizer(PIECES)
    criterion = StopStrings(tokenizer, ("z" * 200, "never"), prompt_tokens=0)
    steps = 3000
    assert run(criterion, [], [0, 1, 2, 3, 4] * (steps // 5)) is None
    # A handful of tokens per step, not the whole text (that would be ~steps / 2 each).
    assert tokenizer.decoded <= 8 * steps


def test_a_stop_string_ends_generation_early(tiny_engine: TransformersEngine) -> None:
    free = tiny_engine.generate(GenerationRequest((), 40, prompt="the quick", ignore_eos=True))
    assert free.completion_tokens == 40 and len(free.text) > 20
    stop = free.text[10:14]
    expected = free.text[: free.text.find(stop)]
    request = GenerationRequest((), 40, prompt="the quick", ignore_eos=True, stop=(stop,))
    stopped = tiny_engine.generate(request)
    assert stopped.text == expected
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens < free.completion_tokens
    chunks = list(tiny_engine.stream(request))
    assert "".join(chunk.text for chunk in chunks) == expected
    assert chunks[-1].completion_tokens == stopped.completion_tokens


def test_a_long_stop_never_indexes_the_vocabulary(
    tiny_engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse() -> dict[str, int]:
        raise AssertionError("the stop check must not index the vocabulary")

    monkeypatch.setattr(tiny_engine.tokenizer, "get_vocab", refuse)
    free = tiny_engine.generate(GenerationRequest((), 30, prompt="hello", ignore_eos=True))
    stops = ("x" * 200, free.text[6:9])
    request = GenerationRequest((), 30, prompt="hello", ignore_eos=True, stop=stops)
    stopped = tiny_engine.generate(request)
    assert stopped.completion_tokens < 30
    assert stopped.text == free.text[: free.text.find(stops[1])]


def test_a_stop_no_text_can_contain_leaves_generation_alone(
    tiny_engine: TransformersEngine,
) -> None:
    # Decoded text never holds a lone surrogate: such a stop is left out of the check.
    request = GenerationRequest((), 8, prompt="hello", ignore_eos=True, stop=("\ud800",))
    assert tiny_engine._stop_criteria(request) == []
    assert tiny_engine.generate(request).completion_tokens == 8
