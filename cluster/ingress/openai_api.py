"""OpenAI-compatible request shapes and limits for the HTTP API, gRPC and handle calls.

Two generation APIs share everything past their prompt: chat completions (a
conversation, formatted by the expert's chat template, with its system prompt) and
text completions (a raw prompt the expert continues as it is). Their sampling fields,
and which of them are refused, are in `cluster/ingress/request_fields.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from actors.engines.base import ChatMessage, GenerationRequest
from actors.engines.text import lone_surrogate_at
from cluster.config import ServeSettings
from cluster.ingress.api_errors import (
    InvalidRequest,
    PromptTooLong,
    Unsupported,
    describe_validation_errors,
)
from cluster.ingress.request_fields import (
    SamplingFields,
    StrictModel,
    engine_settings,
    refuse_unsupported,
)

# OpenAI's own bound on stop sequences.
MAX_STOPS = 4


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class MessageIn(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(StrictModel):
    include_usage: bool = Field(False, description="A last chunk with the usage.")
    continuous_usage_stats: bool = Field(
        False, description="With include_usage: the usage so far on every chunk (vLLM)."
    )


class _Generation(SamplingFields):
    """What both completion APIs take besides their prompt."""

    model: str = Field(min_length=1, description="'coe' to route, or an expert's name.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    stop: str | list[str] | None = Field(
        None, description="Up to 4 stop strings, each within the server's max_stop_chars."
    )
    stream: bool = Field(False, description="Server-sent events in OpenAI's chunk format.")
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _check_stops(self) -> _Generation:
        stops = self.stop_list()
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(
                f"stop takes at most {MAX_STOPS} non-empty strings, got {len(stops)} "
                f"({sum(1 for s in stops if not s)} empty)"
            )
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def usage_on_every_chunk(self) -> bool:
        """vLLM's continuous usage: only together with include_usage, as vLLM does."""
        options = self.stream_options
        return options is not None and options.include_usage and options.continuous_usage_stats

    @property
    def usage_at_end(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Generation):
    """OpenAI's chat completion request, with vLLM's extra sampling fields."""

    messages: list[MessageIn] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: bool | None = Field(None, description="Only false.")

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise ValueError("messages must contain a non-empty user message")
        return self

    def routing_text(self) -> str:
        """The text the router classifies: the latest user turn."""
        return next(m.text() for m in reversed(self.messages) if m.role == "user")


def _message_texts(messages: list[MessageIn]) -> list[tuple[str, str]]:
    return [(f"messages.{i}.content", m.text()) for i, m in enumerate(messages)]


class CompletionRequest(_Generation):
    """OpenAI's legacy text completion request (one prompt), with vLLM's extra fields."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="The text to continue: a string, or a list holding one string."
    )
    echo: bool = Field(False, description="Only false.")
    suffix: str | None = Field(None, description="Not supported.")
    logprobs: int | None = Field(None, ge=0, le=5, description="Not supported.")

    def prompt_text(self) -> str:
        """The one prompt, or a 400 saying why there is not exactly one text prompt."""
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            elif prompt and not all(isinstance(item, str) for item in prompt):
                raise Unsupported(
                    "prompt as token ids is not supported: the experts do not share one "
                    "tokenizer; send the text",
                    param="prompt",
                )
            else:
                raise Unsupported(
                    f"prompt must be one string or a list of one string, got a list of "
                    f"{len(prompt)}; send one request per prompt",
                    param="prompt",
                )
        if not prompt.strip():
            raise InvalidRequest("prompt must be a non-empty string", param="prompt")
        return prompt

    def routing_text(self) -> str:
        return self.prompt_text()


class RouteRequest(StrictModel):
    """Body of POST /v1/route: a prompt, or messages whose last user turn is routed."""

    prompt: str | None = Field(None, min_length=1)
    messages: list[MessageIn] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> RouteRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not any(m.role == "user" for m in self.messages):
            raise ValueError("messages must contain a user message")
        return self

    def routing_text(self) -> str:
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None
        return next(m.text() for m in reversed(self.messages) if m.role == "user")

    def texts(self) -> list[tuple[str, str]]:
        """Every text the router may read, each with the field it came from."""
        if self.prompt is not None:
            return [("prompt", self.prompt)]
        assert self.messages is not None
        return _message_texts(self.messages)


AnyCompletionRequest = ChatCompletionRequest | CompletionRequest


def parse_request(model: type[StrictModel], body: Any) -> Any:
    """Validate a handle caller's dict the way the HTTP layer validates JSON."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        message, param = describe_validation_errors(error.errors())
        raise InvalidRequest(message, param=param) from None


def refuse_lone_surrogates(texts: Iterable[tuple[str, str]]) -> None:
    """400 for a text holding a lone surrogate: JSON and pydantic let one through, but no
    tokenizer encodes it, and in a batch that failure would take the others with it."""
    for param, text in texts:
        at = lone_surrogate_at(text)
        if at is not None:
            raise InvalidRequest(
                f"{param} holds a lone surrogate (U+{ord(text[at]):04X}) at character {at}; "
                "text must be valid Unicode",
                param=param,
            )


def refuse_too_many_messages(count: int, limits: ServeSettings) -> None:
    """Every message costs the chat template a turn of tokens and the router and expert a
    row of work, even an empty one, so the character bound alone does not bound them."""
    if count > limits.max_messages:
        raise InvalidRequest(
            f"the conversation has {count} messages; the limit is {limits.max_messages}",
            param="messages",
        )


def _check_stops(stops: list[str], limits: ServeSettings) -> None:
    """Each stop is matched against the generated text at every token: bound its length."""
    for stop in stops:
        if len(stop) > limits.max_stop_chars:
            raise InvalidRequest(
                f"a stop string has {len(stop)} characters; the limit is {limits.max_stop_chars}",
                param="stop",
            )


def _max_tokens(request: AnyCompletionRequest, limits: ServeSettings) -> int:
    chosen = request.max_tokens
    # Name the field the client actually sent, so the message points at its own request.
    field = "max_tokens"
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens:
        chosen, field = request.max_completion_tokens, "max_completion_tokens"
    max_tokens = chosen or limits.default_max_tokens
    if max_tokens > limits.max_tokens_limit:
        raise InvalidRequest(
            f"{field} {max_tokens} exceeds this server's limit of {limits.max_tokens_limit}",
            param=field,
        )
    if request.min_tokens > max_tokens:
        raise InvalidRequest(
            f"min_tokens {request.min_tokens} exceeds max_tokens {max_tokens}",
            param="min_tokens",
        )
    return max_tokens


def to_generation_request(
    request: AnyCompletionRequest, limits: ServeSettings
) -> GenerationRequest:
    """Apply the server's limits and defaults; raise a typed 4xx error when out of bounds."""
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    if isinstance(request, CompletionRequest):
        prompt = request.prompt_text()
        chars, what, param = len(prompt), "the prompt", "prompt"
        texts = [("prompt", prompt)]
    else:
        refuse_too_many_messages(len(request.messages), limits)
        messages = tuple(ChatMessage(role=m.role, content=m.text()) for m in request.messages)
        chars, what, param = sum(len(m.content) for m in messages), "the conversation", "messages"
        texts = _message_texts(request.messages)
    if chars > limits.max_prompt_chars:
        raise PromptTooLong(
            f"{what} has {chars} characters; the limit is {limits.max_prompt_chars}",
            param=param,
        )
    stops = request.stop_list()
    _check_stops(stops, limits)
    refuse_lone_surrogates([*texts, *(("stop", stop) for stop in stops)])
    max_tokens = _max_tokens(request, limits)
    refuse_unsupported(request)
    return GenerationRequest(
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        stop=tuple(stops),
        **engine_settings(request),
    )
