"""What a load test sends: prompts, expert popularity, arrival times.

A `Workload` is fully planned before anything is sent, and the same seed gives the
same workload, so one workload can be replayed against several systems:

    prompts = load_prompts(default_prompt_files(), limit=400)
    workload = open_loop(prompts, experts, rate=4.0, duration_s=60.0, zipf_s=1.0, seed=7)
    workload = closed_loop(prompts, experts, users=8, count=200, seed=7)
    workload = phased_open_loop(prompts, experts, [(30, 0.5), (60, 4.0), (30, 0.5)], seed=7)

The phased form is a Poisson process whose rate is constant within each
(duration_s, rate) phase: a ramp up, hold, down for autoscaling scenarios.

Randomness is split into independent streams (arrival gaps, experts, prompts, streaming
flags), so changing the skew does not move the arrival times and vice versa.

Popularity is either a Zipf(s) skew over `experts` (the order given is the rank order:
`experts[0]` is the most popular) or, with `expert_for_prompt`, whatever a real router
picks for each prompt.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from router.jsonl import json_objects

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPTS_DIR = PROJECT_ROOT.parent / "shared" / "data" / "prompts"
PROMPT_FIELDS = ("prompt", "question", "text")
# A bound on planned requests, so a typo in rate or duration fails fast instead of
# filling memory with arrival times.
MAX_PLANNED_REQUESTS = 5_000_000

LoopMode = Literal["open", "closed"]


class WorkloadError(ValueError):
    """Bad load-test input: a prompt file, a rate, a bound, a URL."""


# --- prompts -------------------------------------------------------------------------


def default_prompt_files() -> list[Path]:
    """The shared prompt files (`../shared/data/prompts/*.jsonl`), sorted."""
    files = sorted(DEFAULT_PROMPTS_DIR.glob("*.jsonl"))
    if not files:
        raise WorkloadError(
            f"no prompt files in {DEFAULT_PROMPTS_DIR}; pass JSONL files with a 'prompt' field"
        )
    return files


def _message_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        joined = "\n".join(t for t in texts if isinstance(t, str))
        return joined or None
    return None


def prompt_of(record: dict[str, Any]) -> str | None:
    """The first present of `prompt`, `question`, `text`, or the last user message."""
    for name in PROMPT_FIELDS:
        if name in record:
            value = record[name]
            return value if isinstance(value, str) and value.strip() else None
    messages = record.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                text = _message_text(message.get("content"))
                return text if text and text.strip() else None
    return None


def _load_file(path: Path) -> list[str]:
    if not path.is_file():
        raise WorkloadError(f"prompt file {path} does not exist")
    prompts: list[str] = []
    for number, record in json_objects(path, WorkloadError):
        text = prompt_of(record)
        if text is None:
            raise WorkloadError(
                f"{path}:{number}: needs a non-empty 'prompt', 'question' or 'text' string, "
                "or 'messages' with a user message"
            )
        prompts.append(text)
    if not prompts:
        raise WorkloadError(f"prompt file {path} holds no prompts")
    return prompts


def load_prompts(paths: Sequence[Path], limit: int | None = None) -> list[str]:
    """Every prompt of every file; with `limit`, at most that many, taken round-robin
    across the files so each file is represented. Every line is validated either way."""
    if not paths:
        raise WorkloadError("no prompt files given")
    if limit is not None and limit < 1:
        raise WorkloadError(f"prompt limit must be at least 1, got {limit}")
    per_file = [_load_file(Path(path)) for path in paths]
    if limit is None:
        return [prompt for prompts in per_file for prompt in prompts]
    chosen: list[str] = []
    for position in range(max(len(prompts) for prompts in per_file)):
        for prompts in per_file:
            if position < len(prompts):
                chosen.append(prompts[position])
                if len(chosen) == limit:
                    return chosen
    return chosen


# --- popularity and arrivals ---------------------------------------------------------


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Probabilities of ranks 1..n under Zipf(s): rank r has weight r^-s, normalised."""
    if n < 1:
        raise WorkloadError(f"need at least one expert for a Zipf skew, got n={n}")
    if not math.isfinite(s) or s < 0:
        raise WorkloadError(f"Zipf exponent must be finite and >= 0, got {s}")
    weights = np.arange(1, n + 1, dtype=np.float64) ** -s
    return np.asarray(weights / weights.sum())


def _check_experts(experts: Sequence[str]) -> None:
    if not experts:
        raise WorkloadError("no experts given")
    repeated = sorted(name for name, n in Counter(experts).items() if n > 1)
    if repeated:
        raise WorkloadError(f"experts are named more than once: {repeated}")


def sample_experts(
    experts: Sequence[str], s: float, count: int, rng: np.random.Generator
) -> list[str]:
    """`count` expert names drawn from Zipf(s) over `experts` (given in rank order)."""
    _check_experts(experts)
    if count < 0:
        raise WorkloadError(f"count must be >= 0, got {count}")
    picks = rng.choice(len(experts), size=count, p=zipf_weights(len(experts), s))
    return [experts[int(i)] for i in picks]


def _check_bounds(count: int | None, duration_s: float | None) -> None:
    if count is None and duration_s is None:
        raise WorkloadError("bound the load by a request count, a duration, or both")
    if count is not None and not 1 <= count <= MAX_PLANNED_REQUESTS:
        raise WorkloadError(f"count must be in [1, {MAX_PLANNED_REQUESTS}], got {count}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise WorkloadError(f"duration must be a finite number of seconds > 0, got {duration_s}")


def poisson_arrivals(
    rate: float, count: int | None, duration_s: float | None, rng: np.random.Generator
) -> list[float]:
    """Sorted arrival offsets (s) of a Poisson process: exponential gaps of mean 1/rate.

    Stops at `count` arrivals and/or before `duration_s`, whichever comes first."""
    if not (math.isfinite(rate) and rate > 0):
        raise WorkloadError(f"arrival rate must be a finite number of requests/s > 0, got {rate}")
    _check_bounds(count, duration_s)
    if duration_s is not None and rate * duration_s > MAX_PLANNED_REQUESTS:
        raise WorkloadError(
            f"rate {rate}/s over {duration_s} s plans more than {MAX_PLANNED_REQUESTS} requests"
        )
    if count is not None:
        offsets = np.cumsum(rng.exponential(1.0 / rate, size=count))
    else:
        assert duration_s is not None
        # Draw blocks of gaps until the duration is passed; a block covers the mean
        # count plus a generous margin, so usually one block is enough.
        expected = rate * duration_s
        block = int(expected + 6 * math.sqrt(expected) + 16)
        parts: list[np.ndarray] = []
        last = 0.0
        while last < duration_s:
            part = last + np.cumsum(rng.exponential(1.0 / rate, size=block))
            parts.append(part)
            last = float(part[-1])
        offsets = np.concatenate(parts)
    if duration_s is not None:
        offsets = offsets[offsets < duration_s]
    return [float(t) for t in offsets]


def phased_arrivals(phases: Sequence[tuple[float, float]], rng: np.random.Generator) -> list[float]:
    """Poisson arrivals whose rate is piecewise constant: `phases` is a list of
    (duration_s, rate); a phase of rate 0 is idle. Exact, since the process is
    memoryless at phase boundaries."""
    if not phases:
        raise WorkloadError("no phases given")
    offsets: list[float] = []
    start = 0.0
    for number, (duration_s, rate) in enumerate(phases, start=1):
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise WorkloadError(f"phase {number}: duration must be > 0 s, got {duration_s}")
        if not (math.isfinite(rate) and rate >= 0):
            raise WorkloadError(f"phase {number}: rate must be finite and >= 0, got {rate}")
        if rate > 0:
            offsets.extend(start + t for t in poisson_arrivals(rate, None, duration_s, rng))
        start += duration_s
    if len(offsets) > MAX_PLANNED_REQUESTS:
        raise WorkloadError(f"the phases plan more than {MAX_PLANNED_REQUESTS} requests")
    return offsets


# --- the planned workload ------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One request to send: at `at_s` seconds after the start (None: when a user is free)."""

    index: int
    at_s: float | None
    expert: str
    prompt: str
    stream: bool


@dataclass(frozen=True)
class Workload:
    """A planned load: the requests in send order and how they were drawn."""

    requests: tuple[Planned, ...]
    mode: LoopMode
    seed: int
    users: int | None = None  # closed loop: concurrent users
    rate: float | None = None  # open loop: requests/s asked for
    span_s: float | None = None  # open loop: the planned duration (bound or last arrival)
    popularity: str = "zipf"  # "zipf" or "router"
    zipf_s: float | None = None
    phases: tuple[tuple[float, float], ...] | None = None  # phased open loop: (s, rate)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def offered_rps(self) -> float | None:
        """Planned requests per planned second (open loop only)."""
        if self.span_s is None or self.span_s <= 0:
            return None
        return len(self.requests) / self.span_s

    def per_expert(self) -> dict[str, int]:
        """Planned requests per expert, most requested first."""
        return dict(Counter(p.expert for p in self.requests).most_common())

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (no prompts) for a result file."""
        return {
            "mode": self.mode,
            "requests": len(self.requests),
            "seed": self.seed,
            "users": self.users,
            "rate": self.rate,
            "span_s": self.span_s,
            "offered_rps": self.offered_rps,
            "popularity": self.popularity,
            "zipf_s": self.zipf_s,
            "phases": [list(phase) for phase in self.phases] if self.phases else None,
            "stream_requests": sum(p.stream for p in self.requests),
            "per_expert": self.per_expert(),
        }


def _check_stream_fraction(stream_fraction: float) -> None:
    if not (math.isfinite(stream_fraction) and 0.0 <= stream_fraction <= 1.0):
        raise WorkloadError(f"stream fraction must be in [0, 1], got {stream_fraction}")


def _plan(
    at: Sequence[float | None],
    prompts: Sequence[str],
    experts: Sequence[str],
    zipf_s: float,
    stream_fraction: float,
    streams: tuple[np.random.Generator, np.random.Generator, np.random.Generator],
    expert_for_prompt: Callable[[str], str] | None,
) -> tuple[Planned, ...]:
    if not prompts:
        raise WorkloadError("no prompts given")
    _check_stream_fraction(stream_fraction)
    expert_rng, prompt_rng, stream_rng = streams
    count = len(at)
    chosen = [prompts[int(i)] for i in prompt_rng.integers(0, len(prompts), size=count)]
    if expert_for_prompt is None:
        names = sample_experts(experts, zipf_s, count, expert_rng)
    else:
        known = set(experts)
        routed: dict[str, str] = {}  # a router is slow; each distinct prompt once
        for prompt in chosen:
            if prompt not in routed:
                expert = expert_for_prompt(prompt)
                if known and expert not in known:
                    raise WorkloadError(
                        f"the router chose expert {expert!r}, which is not one of {sorted(known)}"
                    )
                routed[prompt] = expert
        names = [routed[prompt] for prompt in chosen]
    streamed = stream_rng.random(count) < stream_fraction
    return tuple(
        Planned(index=i, at_s=at[i], expert=names[i], prompt=chosen[i], stream=bool(streamed[i]))
        for i in range(count)
    )


def _streams(seed: int) -> list[np.random.Generator]:
    # arrivals, experts, prompts, streaming flags
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]


def open_loop(
    prompts: Sequence[str],
    experts: Sequence[str],
    rate: float,
    count: int | None = None,
    duration_s: float | None = None,
    zipf_s: float = 1.0,
    stream_fraction: float = 0.0,
    seed: int = 0,
    expert_for_prompt: Callable[[str], str] | None = None,
) -> Workload:
    """Poisson arrivals at `rate`/s, bounded by `count` and/or `duration_s`."""
    arrival_rng, expert_rng, prompt_rng, stream_rng = _streams(seed)
    at = poisson_arrivals(rate, count, duration_s, arrival_rng)
    if not at:
        raise WorkloadError(
            f"rate {rate}/s over {duration_s} s plans no request at all; raise either"
        )
    return _open_workload(
        at,
        prompts,
        experts,
        zipf_s,
        stream_fraction,
        seed,
        (expert_rng, prompt_rng, stream_rng),
        expert_for_prompt,
        rate=rate,
        span_s=duration_s if duration_s is not None else at[-1],
    )


def _open_workload(
    at: list[float],
    prompts: Sequence[str],
    experts: Sequence[str],
    zipf_s: float,
    stream_fraction: float,
    seed: int,
    rngs: tuple[np.random.Generator, np.random.Generator, np.random.Generator],
    expert_for_prompt: Callable[[str], str] | None,
    **shape: Any,
) -> Workload:
    """An open-loop workload at the arrival offsets `at`; `shape` describes the arrivals."""
    planned = _plan(at, prompts, experts, zipf_s, stream_fraction, rngs, expert_for_prompt)
    return Workload(
        requests=planned,
        mode="open",
        seed=seed,
        popularity="router" if expert_for_prompt else "zipf",
        zipf_s=None if expert_for_prompt else zipf_s,
        **shape,
    )


def phased_open_loop(
    prompts: Sequence[str],
    experts: Sequence[str],
    phases: Sequence[tuple[float, float]],
    zipf_s: float = 1.0,
    stream_fraction: float = 0.0,
    seed: int = 0,
    expert_for_prompt: Callable[[str], str] | None = None,
) -> Workload:
    """Poisson arrivals at a piecewise-constant rate: `phases` = [(duration_s, rate), ...]."""
    arrival_rng, expert_rng, prompt_rng, stream_rng = _streams(seed)
    at = phased_arrivals(phases, arrival_rng)
    if not at:
        raise WorkloadError(f"the phases {list(phases)} plan no request at all")
    return _open_workload(
        at,
        prompts,
        experts,
        zipf_s,
        stream_fraction,
        seed,
        (expert_rng, prompt_rng, stream_rng),
        expert_for_prompt,
        span_s=sum(duration for duration, _ in phases),
        phases=tuple((float(d), float(r)) for d, r in phases),
    )


def closed_loop(
    prompts: Sequence[str],
    experts: Sequence[str],
    users: int,
    count: int,
    zipf_s: float = 1.0,
    stream_fraction: float = 0.0,
    seed: int = 0,
    expert_for_prompt: Callable[[str], str] | None = None,
) -> Workload:
    """`count` requests for `users` concurrent users, each sending its next request as
    soon as its previous one is answered (the driver's duration bound may stop it early)."""
    if users < 1:
        raise WorkloadError(f"closed loop needs at least one user, got {users}")
    _check_bounds(count, None)
    _arrival_rng, expert_rng, prompt_rng, stream_rng = _streams(seed)
    planned = _plan(
        [None] * count,
        prompts,
        experts,
        zipf_s,
        stream_fraction,
        (expert_rng, prompt_rng, stream_rng),
        expert_for_prompt,
    )
    return Workload(
        requests=planned,
        mode="closed",
        seed=seed,
        users=users,
        popularity="router" if expert_for_prompt else "zipf",
        zipf_s=None if expert_for_prompt else zipf_s,
    )
