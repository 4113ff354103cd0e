"""The sampling fields chat and text completions share, and which of them are refused.

The servers people run beside this one (vLLM, Ray Serve LLM, SGLang) accept vLLM's extra
sampling fields, and the tools of that ecosystem send them (guidellm sends `ignore_eos`
and `stream_options.continuous_usage_stats`). Every field here is one of OpenAI's or one
of vLLM's documented extras, in three kinds:

- honoured: `top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos` reach the
  engine (`GenerationRequest`);
- accepted and ignored, because they cannot change an answer here: `length_penalty`
  (beam search only, as in vLLM), `spaces_between_special_tokens` (special tokens are
  never shown), `user`;
- refused when asked for (`REFUSALS`): sent with their neutral value (`n: 1`,
  `logprobs: false`, `presence_penalty: 0`, ...) they are accepted, since clients send
  defaults explicitly; any other value is a 400 naming the field and the reason.

Any field outside this list is still an unknown field, and a 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.ingress.api_errors import Unsupported


class StrictModel(BaseModel):
    # strict: "5" is not a number and "hi" is not a list; unknown fields are errors.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SamplingFields(StrictModel):
    """Fields of both completion APIs beyond the prompt, model, limits and stops."""

    temperature: float | None = Field(None, ge=0, le=2, description="0 or unset: greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(
        None,
        ge=-(2**63),
        le=2**63 - 1,
        description="Sampling seed, a 64-bit signed integer (as in the gRPC API).",
    )
    n: int | None = Field(None, ge=1, description="Choices per request; only 1.")
    user: str | None = Field(None, description="Accepted and ignored.")
    # vLLM's extra sampling fields, honoured.
    top_k: int | None = Field(None, ge=-1, description="Top-k when sampling; -1, 0 or unset: off.")
    min_p: float | None = Field(None, ge=0, le=1, description="Min-p when sampling; 0: off.")
    repetition_penalty: float | None = Field(
        None,
        # vLLM takes any value above 0; near 0 the penalised logits overflow to inf.
        ge=0.01,
        allow_inf_nan=False,
        description="> 1 discourages repeats (greedy decoding too); 1 or unset: off.",
    )
    min_tokens: int = Field(0, ge=0, description="No end-of-sequence before this many tokens.")
    ignore_eos: bool = Field(False, description="Generate max_tokens, never ending at EOS.")
    # Accepted and ignored: they cannot change an answer here.
    length_penalty: float = Field(
        1.0, allow_inf_nan=False, description="Beam search only: ignored, as in vLLM."
    )
    spaces_between_special_tokens: bool = Field(
        True, description="Ignored: special tokens are never shown."
    )
    # Refused unless neutral (see REFUSALS).
    best_of: int | None = Field(None, ge=1, description="Only 1.")
    use_beam_search: bool = Field(False, description="Only false.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Only 0.")
    prompt_logprobs: int | None = Field(None, ge=0, description="Not supported.")
    skip_special_tokens: bool = Field(True, description="Only true.")
    include_stop_str_in_output: bool = Field(False, description="Only false.")
    stop_token_ids: list[int] | None = Field(None, description="Only empty.")
    bad_words: list[str] | None = Field(None, description="Only empty.")
    allowed_token_ids: list[int] | None = Field(None, description="Not supported.")
    truncate_prompt_tokens: int | None = Field(None, ge=1, description="Not supported.")
    priority: int = Field(0, description="Only 0: requests are served in arrival order.")


@dataclass(frozen=True)
class Refusal:
    """A field refused unless it holds one of its neutral values."""

    field: str
    neutral: tuple[Any, ...]
    reason: str


NO_LOGPROBS = "log probabilities are not returned by this server's engines"
REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        "n",
        (None, 1),
        "one choice per request; each further choice would cost a whole decode, so "
        "send n requests instead",
    ),
    Refusal("best_of", (None, 1), "one candidate per request, as with n"),
    Refusal("use_beam_search", (False,), "the engines decode greedily or by sampling"),
    Refusal("echo", (None, False), "the answer never repeats the prompt"),
    Refusal("suffix", (None,), "the engines do not fill in the middle"),
    Refusal("logprobs", (None, False), NO_LOGPROBS),
    Refusal("top_logprobs", (None, 0), NO_LOGPROBS),
    Refusal("prompt_logprobs", (None,), NO_LOGPROBS),
    Refusal(
        "presence_penalty",
        (None, 0),
        "the engines have no presence penalty; repetition_penalty is honoured",
    ),
    Refusal(
        "frequency_penalty",
        (None, 0),
        "the engines have no frequency penalty; repetition_penalty is honoured",
    ),
    Refusal("logit_bias", (None, {}), "the engines take no per-token bias"),
    Refusal("skip_special_tokens", (True,), "special tokens are always left out of answers"),
    Refusal("include_stop_str_in_output", (False,), "answers end before their stop string"),
    Refusal("stop_token_ids", (None, []), "stops are strings (stop); token ids differ by expert"),
    Refusal("bad_words", (None, []), "the engines take no banned words"),
    Refusal("allowed_token_ids", (None,), "the engines take no token allow-list"),
    Refusal("truncate_prompt_tokens", (None,), "a prompt over the limits is refused, not cut"),
    Refusal("priority", (0,), "requests are served in arrival order"),
)


def is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    """Whether `value` is one of `neutral`; None and booleans match only themselves
    (so 0 is not False, and 1 is not True)."""
    for candidate in neutral:
        if candidate is None or isinstance(candidate, bool):
            if value is candidate:
                return True
        elif not isinstance(value, bool) and value == candidate:
            return True
    return False


def refuse_unsupported(request: BaseModel) -> None:
    """Raise `Unsupported` for the first refused field that is not neutral."""
    fields = type(request).model_fields
    for refusal in REFUSALS:
        if refusal.field not in fields:
            continue
        value = getattr(request, refusal.field)
        if not is_neutral(value, refusal.neutral):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise Unsupported(
                f"{refusal.field}={shown} is not supported: {refusal.reason}",
                param=refusal.field,
            )


def engine_settings(request: SamplingFields) -> dict[str, Any]:
    """The honoured sampling fields as `GenerationRequest` keyword arguments."""
    top_k = request.top_k if request.top_k is not None and request.top_k > 0 else None
    min_p = request.min_p if request.min_p else None
    return {
        "temperature": request.temperature or 0.0,
        "top_p": request.top_p or 1.0,
        "seed": request.seed,
        "top_k": top_k,
        "min_p": min_p,
        "repetition_penalty": request.repetition_penalty or 1.0,
        "min_tokens": request.min_tokens,
        "ignore_eos": request.ignore_eos,
    }
