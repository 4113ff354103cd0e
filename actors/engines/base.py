"""The engine interface every expert backend implements.

An engine owns one model's weights on one device and turns a conversation into
text, either all at once (`generate`) or as it is produced (`stream`). Engines are
plain classes; `cluster/` makes them Ray Serve replicas.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


# Below this a temperature decodes greedily: sampling at temperature t divides the logits
# by t, and for t near the smallest floats that overflows to inf and the softmax to NaN.
# Greedy decoding is what sampling tends to as t -> 0, so the answer is the limit, not a
# refusal; at 1e-6 any logit below 1e32 still divides to a finite number.
MIN_SAMPLING_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class GenerationRequest:
    """One answer to generate: a conversation, or (`prompt`) raw text to continue.

    A raw prompt is a text completion: no chat template and no system prompt, the
    model continues the text as it is. `top_k` and `min_p` (None: off) shape sampling
    only; `repetition_penalty` (1: off) and `min_tokens` apply to greedy decoding too.
    """

    messages: tuple[ChatMessage, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # no end-of-sequence token before this many new tokens
    ignore_eos: bool = False  # the end-of-sequence token never ends the answer
    prompt: str | None = None

    @property
    def samples(self) -> bool:
        """Whether this request samples; False means greedy decoding."""
        return self.temperature >= MIN_SAMPLING_TEMPERATURE

    @property
    def min_new_tokens(self) -> int:
        """Tokens before which end-of-sequence is suppressed: all of them with
        `ignore_eos`, so the answer runs to `max_tokens` unless a stop string ends it."""
        return self.max_tokens if self.ignore_eos else min(self.min_tokens, self.max_tokens)


class ContextLengthExceeded(ValueError):
    """The prompt's tokens and the token budget do not fit the expert's context window.

    Raised before generating. It is the client's error (OpenAI's 400
    `context_length_exceeded`); it lives here because the engine that counts the tokens
    and the ingress that answers the client both see this module. The constructor's
    arguments are its `args`, so it pickles across processes as it is; read `message`,
    not `str()`: Serve may hand it over wrapped in a `RayTaskError`, whose `str()` is a
    traceback and whose missing attributes are looked up on this error.
    """

    def __init__(
        self, context_length: int, prompt_tokens: int, max_tokens: int, part: str = "messages"
    ) -> None:
        super().__init__(context_length, prompt_tokens, max_tokens, part)
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.part = part  # "messages" (a chat) or "prompt" (a text completion)

    @property
    def message(self) -> str:
        requested = self.prompt_tokens + self.max_tokens
        return (
            f"This model's maximum context length is {self.context_length} tokens. However, "
            f"you requested {requested} tokens ({self.prompt_tokens} in the {self.part}, "
            f"{self.max_tokens} in the completion). Please reduce the length of the "
            f"{self.part} or completion."
        )

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass(frozen=True)
class StreamChunk:
    """A piece of streamed text; the last chunk carries the finish reason and the
    counts. Engines also give text chunks the counts so far (vLLM's continuous usage);
    a chunk without them has zeros."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Cancellation:
    """Set by the caller when nobody wants the rest of an answer (the client went away
    or its deadline passed); the engine stops at the next token."""

    event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.event.set()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()


class Engine(Protocol):
    """What an expert server needs from an inference backend."""

    name: str

    def generate(
        self, request: GenerationRequest, cancellation: Cancellation | None = None
    ) -> GenerationResult:
        """The whole answer; a `cancellation` set meanwhile may end it early."""
        ...

    def stream(
        self, request: GenerationRequest, cancellation: Cancellation | None = None
    ) -> Iterator[StreamChunk]: ...

    def close(self) -> None: ...


def batch_key(request: GenerationRequest) -> Hashable | None:
    """Requests with equal keys may share a batch; None: this one runs alone.

    One `generate` call has one sampling setting, so the key is that setting: the
    logits processors (repetition penalty, end-of-sequence suppression) and, when
    sampling, the warpers. Seeded sampling runs alone: its answer must not depend on
    what it was batched with.
    """
    decoding = (request.repetition_penalty, request.min_new_tokens)
    if request.samples:
        if request.seed is not None:
            return None
        return (
            "sample",
            request.temperature,
            request.top_p,
            request.top_k,
            request.min_p,
            *decoding,
        )
    return ("greedy", *decoding)


@dataclass
class BatchJob:
    """One request inside a batch; `emit` is called from the engine's thread with its
    chunks, the last one carrying the finish reason (or with the error that ended it)."""

    request: GenerationRequest
    emit: Callable[[StreamChunk | BaseException], None]
    cancellation: Cancellation = field(default_factory=Cancellation)
    # Whether the client streams: a lone non-streamed job may be answered in one piece.
    stream: bool = True
    ended: bool = False  # its last chunk or an error was emitted
