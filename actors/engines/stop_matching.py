"""Stop strings checked on the generated text itself, at a cost linear in its length.

transformers' `StopStringCriteria` first tabulates, for every token of the vocabulary,
where it could overlap each stop string: a vocabulary x stop-length table built in
Python before the first token, inside the active slot, and rebuilt for each new set of
stops. Here each step decodes only the newest tokens and looks for the stops in the
last few characters, so the cost per token depends on the stops' length alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria

from actors.engines.text import lone_surrogate_at

# A character spans at most 4 tokens (byte-level BPE: one UTF-8 byte each); text still
# incomplete after this many is not half a character but bytes that never form one.
MAX_PENDING_TOKENS = 8


class IncrementalText:
    """One sequence's tokens turned into text piece by piece.

    Each step decodes a short window of recent tokens and hands out only what it adds,
    so a character split over tokens is never handed out half-made and the work stays
    linear in the text's length.
    """

    def __init__(self, tokenizer: Any, max_pending: int | None = None) -> None:
        """`max_pending`: hand out text after that many tokens even when it still ends
        in an incomplete character (None: wait for it to complete)."""
        self.tokenizer = tokenizer
        self.max_pending = max_pending
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token: int) -> str:
        """Add a token; the text it completes ("" while a character is incomplete)."""
        self.tokens.append(token)
        decode = self.tokenizer.decode
        seen = decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        grown = decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        pending = len(self.tokens) - self.read_offset
        forced = self.max_pending is not None and pending >= self.max_pending
        if not forced and (len(grown) <= len(seen) or grown.endswith("\ufffd")):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return grown[len(seen) :]


def matchable(stops: Sequence[str]) -> tuple[str, ...]:
    """The stops decoded text can contain: non-empty, and no lone surrogate in them."""
    return tuple(s for s in dict.fromkeys(stops) if s and lone_surrogate_at(s) is None)


class _Row:
    def __init__(self, tokenizer: Any, keep: int) -> None:
        self.text = IncrementalText(tokenizer, MAX_PENDING_TOKENS)
        self.keep = keep
        self.tail = ""  # the last `keep` characters: room for all but one of a stop's
        self.stopped = False

    def add(self, token: int, stops: tuple[str, ...]) -> bool:
        piece = self.text.push(token)
        if piece:
            window = self.tail + piece
            self.stopped = any(stop in window for stop in stops)
            self.tail = window[-self.keep :] if self.keep else ""
        return self.stopped


class StopStrings(StoppingCriteria):
    """Ends each row of a `generate` call once its generated text holds one of `stops`.

    The text is still cut at the stop afterwards (`trim_at_stop`, `StopTrimmer`); this
    only stops spending the device on tokens past it.
    """

    def __init__(
        self, tokenizer: Any, stops: Sequence[str], prompt_tokens: int | None = None
    ) -> None:
        """`prompt_tokens`: where generated tokens begin in the ids `generate` passes;
        None learns it at the first call, which `generate` makes after one new token."""
        self.tokenizer = tokenizer
        self.stops = matchable(stops)
        self.prompt_tokens = prompt_tokens
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        self._rows: list[_Row] = []
        self._seen = 0  # ids per row already read

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        if not self._rows:
            start = input_ids.shape[1] - 1 if self.prompt_tokens is None else self.prompt_tokens
            self._rows = [_Row(self.tokenizer, self._keep) for _ in range(input_ids.shape[0])]
            self._seen = start
        new = input_ids[:, self._seen :].tolist()
        self._seen = input_ids.shape[1]
        done = []
        for row, tokens in zip(self._rows, new, strict=True):
            for token in tokens:
                if row.stopped:
                    break
                row.add(int(token), self.stops)
            done.append(row.stopped)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]
