"""The plain transformers engine: one causal LM on one device.

An engine runs where its model's weights are: every input and generation tensor it
makes goes to the device of the model's parameters at that moment. A model it is given
(a tiered one: views into the arena, bound per batch) is never moved; only a model the
engine loads itself is placed, on CUDA when there is one.

One generation runs at a time per engine (the lock is the device's active slot);
Serve queues the rest. Streaming runs `generate` on a worker thread that feeds a
`TextIteratorStreamer`; a cancelled stream stops generation at the next token.
`stream_batch` decodes several requests in one `generate` call (see
`actors/batching.py` for which requests are batched).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from actors.engines.base import (
    BatchJob,
    Cancellation,
    ChatMessage,
    ContextLengthExceeded,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
    batch_key,
)
from actors.engines.batch_rows import BatchRows
from actors.engines.stop_matching import StopStrings, matchable
from actors.engines.text import StopTrimmer, plain_transcript, trim_at_stop
from actors.weights.checkpoint import validate_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A base model without a chat template continues a transcript; these end its turn.
PLAIN_STOPS = ("\nUser:", "\nAssistant:")
# A tokenizer that does not know its model's window says VERY_LARGE_INTEGER (1e30);
# no model has a window anywhere near this, so a larger model_max_length means unknown.
SANE_MODEL_MAX_LENGTH = 10_000_000


def default_device() -> str:
    """Where an engine puts a model it loads itself: CUDA when there is one, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_device(model: Any) -> torch.device:
    """Where `model`'s weights are now: its first parameter's device (its first buffer's
    for a model without parameters; CPU for one with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def context_length_of(config: Any, tokenizer: Any) -> int | None:
    """The model's context window in tokens: its config's `max_position_embeddings`, else
    the tokenizer's `model_max_length` when it is a real bound; None when neither says."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        return positions
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length <= SANE_MODEL_MAX_LENGTH:
        return length
    return None


class _CountingStreamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` that also counts the tokens generated so far."""

    generated = 0

    def put(self, value: torch.Tensor) -> None:
        prompt = self.skip_prompt and self.next_tokens_are_prompt
        super().put(value)
        if not prompt:
            self.generated += int(value.numel())


class _Cancelled(StoppingCriteria):
    def __init__(self, cancellation: Cancellation) -> None:
        self.cancellation = cancellation

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        flag = self.cancellation.cancelled
        return torch.full((input_ids.shape[0],), flag, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class TransformersEngine:
    """Serves one safetensors checkpoint with `transformers.generate`."""

    def __init__(
        self,
        name: str,
        checkpoint_dir: Path,
        dtype: str = "float32",
        chat_format: str = "template",
        device: str | None = None,
        model: Any | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        """Load `checkpoint_dir`, or serve `model` when given: a model whose weights the
        memory tiers bind as views into a device arena. The tokenizer comes from the
        checkpoint directory unless `tokenizer` is given (an executor shares one among
        experts whose tokenizer files are the same).

        `device` is where a loaded model goes (default: `default_device()`); a given
        model stays where it is, so `device` cannot be given with one.
        """
        validate_checkpoint(checkpoint_dir)
        if model is not None and device is not None:
            raise ValueError(
                f"expert {name!r}: a given model runs where its weights are; "
                f"device={device!r} applies only to a model the engine loads"
            )
        self.name = name
        self.chat_format = chat_format
        # Whether the model is the caller's: a tiered model's tensors are views into the
        # arena, which moving (or wrapping, see DeepSpeedEngine) would replace by copies.
        self.owns_model = model is None
        started = time.monotonic()
        # transformers' auto classes are typed loosely; the engine treats them as Any.
        self.tokenizer: Any = (
            tokenizer
            if tokenizer is not None
            else AutoTokenizer.from_pretrained(str(checkpoint_dir))
        )
        if model is None:
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                str(checkpoint_dir), dtype=DTYPES[dtype], use_safetensors=True
            )
            model = loaded.to(device or default_device())
        self.model = self._prepare(model.eval(), DTYPES[dtype])
        self.context_length = context_length_of(self.model.config, self.tokenizer)
        self.load_seconds = time.monotonic() - started
        self.parameter_count = sum(p.numel() for p in self.model.parameters())
        self._slot = threading.Lock()

    def _prepare(self, model: Any, dtype: torch.dtype) -> Any:
        """Hook for engines that wrap the loaded model (DeepSpeed)."""
        return model

    @property
    def device(self) -> torch.device:
        """Where the model's weights are now. Read per request, not fixed at start: an
        executor builds the engine over a meta-device skeleton and binds an expert's
        arena region into it only before each batch, and the arena is host memory even
        on a machine with a GPU."""
        return model_device(self.model)

    def _input_device(self) -> torch.device:
        """The device inputs go to; a skeleton not bound yet has no memory to run on."""
        device = self.device
        if device.type == "meta":
            raise RuntimeError(
                f"expert {self.name!r}: its model's weights are not bound to memory "
                "(still on the meta device); bind a grant before generating"
            )
        return device

    # -- prompt -------------------------------------------------------------------

    def _transcript(self, request: GenerationRequest) -> bool:
        """Whether the answer is a turn of a plain transcript (a base model's chat)."""
        return self.chat_format == "plain" and request.prompt is None

    def _stops(self, request: GenerationRequest) -> tuple[str, ...]:
        plain = PLAIN_STOPS if self._transcript(request) else ()
        return tuple(dict.fromkeys(plain + request.stop))

    def encode_request(self, request: GenerationRequest) -> dict[str, torch.Tensor]:
        """The model's input: a raw prompt as it is, else the conversation. Raises
        `ContextLengthExceeded` when its tokens and the budget do not fit the window."""
        if request.prompt is None:
            inputs = self.encode(request.messages)
        else:
            encoded: Any = self.tokenizer(request.prompt, return_tensors="pt")
            device = self._input_device()
            inputs = {key: value.to(device) for key, value in encoded.items()}
        self._check_context(request, int(inputs["input_ids"].shape[1]))
        return inputs

    def _check_context(self, request: GenerationRequest, prompt_tokens: int) -> None:
        """Refuse before generating: past its window a model fails (learned positions)
        or degrades silently (rotary ones), and either way only after spending the slot."""
        limit = self.context_length
        if limit is not None and prompt_tokens + request.max_tokens > limit:
            part = "messages" if request.prompt is None else "prompt"
            raise ContextLengthExceeded(limit, prompt_tokens, request.max_tokens, part)

    def encode(self, messages: tuple[ChatMessage, ...]) -> dict[str, torch.Tensor]:
        as_dicts = [{"role": m.role, "content": m.content} for m in messages]
        if self.chat_format == "template" and self.tokenizer.chat_template:
            encoded: Any = self.tokenizer.apply_chat_template(
                as_dicts, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            encoded = self.tokenizer(plain_transcript(messages), return_tensors="pt")
        device = self._input_device()
        return {key: value.to(device) for key, value in encoded.items()}

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)

    @staticmethod
    def _sampling_kwargs(request: GenerationRequest) -> dict[str, Any]:
        """`generate`'s decoding settings. Unset top_k is off (0), not transformers'
        default of 50: an OpenAI client that sets only top_p gets nucleus sampling."""
        kwargs: dict[str, Any] = {
            "repetition_penalty": request.repetition_penalty,
            "min_new_tokens": request.min_new_tokens or None,
        }
        if request.samples:
            kwargs.update(
                do_sample=True,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k or 0,
                min_p=request.min_p,
            )
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
        return kwargs

    def _generate_kwargs(
        self, request: GenerationRequest, inputs: dict[str, Any]
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(inputs)
        kwargs["max_new_tokens"] = request.max_tokens
        kwargs["pad_token_id"] = self.pad_token_id
        # Never compile: on a GPU, transformers compiles the forward pass (with CUDA
        # graphs) for caches it deems compilable (Gemma 3's sliding-window one), and a
        # captured graph keeps the pointers of the weights it saw, so it would go on
        # running the previous expert's bytes after a tier switch rebinds the views.
        kwargs["disable_compile"] = True
        kwargs.update(self._sampling_kwargs(request))
        prompt_tokens = int(inputs["input_ids"].shape[1])
        criteria = self._stop_criteria(request, prompt_tokens)
        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
        return kwargs

    def _stop_criteria(
        self, request: GenerationRequest, prompt_tokens: int | None = None
    ) -> list[StoppingCriteria]:
        """End generation at the request's stop strings (the text is cut at the stop
        either way; this frees the slot there instead of at the token budget). A stop no
        decoded text can contain (a lone surrogate) is left out."""
        stops = matchable(self._stops(request))
        if not stops:
            return []
        return [StopStrings(self.tokenizer, stops, prompt_tokens)]

    def answer_text(self, text: str, request: GenerationRequest) -> str:
        """A whole (non-streamed) answer as returned: a base model continues
        "Assistant:" after a space, so its answer is trimmed (a raw prompt's
        continuation is returned as generated)."""
        return text.strip() if self._transcript(request) else text

    def _seed(self, request: GenerationRequest) -> None:
        if request.seed is not None:
            torch.manual_seed(request.seed)

    @staticmethod
    def _finish(new_tokens: int, request: GenerationRequest, stopped: bool) -> FinishReason:
        return "stop" if stopped or new_tokens < request.max_tokens else "length"

    # -- generation ---------------------------------------------------------------

    def generate(
        self, request: GenerationRequest, cancellation: Cancellation | None = None
    ) -> GenerationResult:
        """The whole answer; a `cancellation` set meanwhile ends it at the next token
        (a timed-out or abandoned request must not hold the slot to its budget)."""
        inputs = self.encode_request(request)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        kwargs = self._generate_kwargs(request, inputs)
        if cancellation is not None:
            kwargs["stopping_criteria"].append(_Cancelled(cancellation))
        with self._slot, torch.inference_mode():
            self._seed(request)
            output = self.model.generate(**kwargs)
        new_ids = output[0][prompt_tokens:]
        raw: str = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        text, stopped = trim_at_stop(raw, self._stops(request))
        return GenerationResult(
            text=self.answer_text(text, request),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new_ids),
            finish_reason=self._finish(len(new_ids), request, stopped),
        )

    def stream(
        self, request: GenerationRequest, cancellation: Cancellation | None = None
    ) -> Iterator[StreamChunk]:
        cancellation = cancellation or Cancellation()
        inputs = self.encode_request(request)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        streamer = _CountingStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        kwargs = self._generate_kwargs(request, inputs)
        kwargs["streamer"] = streamer
        kwargs["stopping_criteria"].append(_Cancelled(cancellation))
        produced: dict[str, Any] = {}

        def run() -> None:
            with self._slot, torch.inference_mode():
                try:
                    self._seed(request)
                    produced["output"] = self.model.generate(**kwargs)
                except BaseException as error:  # re-raised on the consumer's side
                    produced["error"] = error
                    streamer.end()

        worker = threading.Thread(target=run, name=f"{self.name}-generate", daemon=True)
        worker.start()
        trimmer = StopTrimmer(self._stops(request))
        drained = False
        try:
            for piece in streamer:
                text = trimmer.feed(piece)
                if text:
                    yield StreamChunk(text, None, prompt_tokens, streamer.generated)
                if trimmer.stopped:
                    break
            drained = True
        finally:
            # A stop string ended the text, or the consumer went away: either way
            # the worker should stop spending the device on tokens nobody reads.
            if trimmer.stopped or not drained:
                cancellation.cancel()
            worker.join()
        if "error" in produced:
            raise produced["error"]
        tail = trimmer.flush()
        new_tokens = int(produced["output"].shape[1]) - prompt_tokens
        yield StreamChunk(
            text=tail,
            finish_reason=self._finish(new_tokens, request, trimmer.stopped),
            prompt_tokens=prompt_tokens,
            completion_tokens=new_tokens,
        )

    def stream_batch(self, jobs: Sequence[BatchJob]) -> None:
        """Decode several requests as one left-padded batch, each with its own token
        budget, stop strings and cancellation; every job's chunks go to its `emit`.

        The jobs must share a batch key (`actors.batching.batch_key`): one sampling
        setting for the whole batch, and no seeded sampling. A job whose prompt cannot
        be encoded ends with its own error; the others decode without it.
        """
        keys = {batch_key(job.request) for job in jobs}
        if len(jobs) > 1 and (None in keys or len(keys) > 1):
            raise ValueError("a batch needs one sampling setting and no seeded sampling")
        jobs, prompts = self._encode_rows(jobs)
        if not jobs:
            return
        first = jobs[0].request
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(jobs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            # Left padding: every row's next token is at the same position.
            input_ids[row, width - len(ids) :] = ids
            attention_mask[row, width - len(ids) :] = 1
        rows = BatchRows(
            self.tokenizer,
            [
                (job, self._stops(job.request), len(ids))
                for job, ids in zip(jobs, prompts, strict=True)
            ],
            self._eos_ids(),
            self.answer_text,
        )
        device = self._input_device()
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "max_new_tokens": max(job.request.max_tokens for job in jobs),
            "pad_token_id": self.pad_token_id,
            "streamer": rows,
            "stopping_criteria": StoppingCriteriaList([rows]),
            "disable_compile": True,  # see _generate_kwargs
        }
        kwargs.update(self._sampling_kwargs(first))
        with self._slot, torch.inference_mode():
            self._seed(first)
            self.model.generate(**kwargs)
        rows.finish()

    def _encode_rows(self, jobs: Sequence[BatchJob]) -> tuple[list[BatchJob], list[torch.Tensor]]:
        """Each job's prompt ids; a job that fails to encode gets its error now and is
        left out, so one bad request fails only itself."""
        kept: list[BatchJob] = []
        prompts: list[torch.Tensor] = []
        for job in jobs:
            try:
                prompts.append(self.encode_request(job.request)["input_ids"][0])
            except Exception as error:
                job.emit(error)
                continue
            kept.append(job)
        return kept, prompts

    def _eos_ids(self) -> frozenset[int]:
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if configured is None:
            configured = self.tokenizer.eos_token_id
        if configured is None:
            return frozenset()
        return frozenset([configured] if isinstance(configured, int) else configured)

    def close(self) -> None:
        # Only an engine whose model was on a GPU has cached GPU blocks to hand back; a
        # host-bound (tiered) model on a GPU machine must not touch CUDA at all.
        on_cuda = self.model is not None and self.device.type == "cuda"
        self.model = None
        if on_cuda:
            torch.cuda.empty_cache()
