"""The soak's pure parts: the planned mix of requests, the bytes each bad one sends, how
each answer is classified, and the report (see benchmarks/soak.py for the run itself).

Kinds: `good` (routed or named, streamed or not), `bad` (each variant in `BAD_STATUS`
with the one status that is the right answer to it) and `cancel` (a stream the client
closes after its first content chunk). Results: `ok`; `overloaded` (a 429, a polite
refusal: counted, not a failure); the failures `unexpected_status`, `transport` and
`wrong_expert`; and `not_sent` (the client's own in-flight bound).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from benchmarks.harness import stats, workload
from benchmarks.harness.client import Outcome

Kind = Literal["good", "bad", "cancel"]
Result = Literal["ok", "overloaded", "unexpected_status", "transport", "wrong_expert", "not_sent"]
KINDS: tuple[Kind, ...] = ("good", "bad", "cancel")
RESULTS: tuple[Result, ...] = (
    "ok",
    "overloaded",
    "unexpected_status",
    "transport",
    "wrong_expert",
    "not_sent",
)
FAILURES: frozenset[Result] = frozenset({"unexpected_status", "transport", "wrong_expert"})
# Each bad variant and the one status that is the right answer to it.
BAD_STATUS = {
    "invalid-json": 400,
    "unknown-model": 404,
    "prompt-too-long": 400,
    "max-tokens-over-limit": 400,
    "wrong-types": 400,
}
_INVALID_JSON = (b'{"model": "coe", "messages": [', b"\xff\xfe{", b"")
_WRONG_TYPES: tuple[dict[str, Any], ...] = (
    {"model": "coe", "messages": "hello"},
    {"model": "coe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"},
    {"model": 7, "messages": [{"role": "user", "content": "hi"}]},
    {"model": "coe", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
)
_EXAMPLES = 10

# --- the plan (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    """Shares of the traffic: `bad` and `cancel` of all requests (good gets the rest);
    `stream` of good requests and `routed` of good and cancelled ones."""

    bad: float = 0.25
    cancel: float = 0.15
    stream: float = 0.5
    routed: float = 0.5

    def __post_init__(self) -> None:
        for name in ("bad", "cancel", "stream", "routed"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise workload.WorkloadError(f"{name} share must be in [0, 1], got {value}")
        if self.bad + self.cancel > 1.0:
            raise workload.WorkloadError(
                f"bad ({self.bad}) + cancel ({self.cancel}) shares exceed 1"
            )


@dataclass(frozen=True)
class Limits:
    """The server's limits, which the over-limit bad requests step just past."""

    max_prompt_chars: int
    max_tokens_limit: int


@dataclass(frozen=True)
class SoakRequest:
    index: int
    at_s: float
    kind: Kind
    variant: str
    model: str  # "coe", an expert, or (unknown-model) a name no cluster has
    prompt: str
    stream: bool


def plan_soak(
    prompts: Sequence[str],
    experts: Sequence[str],
    rate: float,
    duration_s: float,
    mix: Mix,
    seed: int = 0,
    zipf_s: float = 1.0,
) -> list[SoakRequest]:
    """Poisson arrivals over `duration_s`, each given a kind, a variant and a model (seeded)."""
    if not prompts:
        raise workload.WorkloadError("no prompts given")
    arrivals, kinds, variants, models, prompt_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )
    at = workload.poisson_arrivals(rate, None, duration_s, arrivals)
    count = len(at)
    experts_drawn = workload.sample_experts(experts, zipf_s, count, models)
    chosen = prompt_rng.integers(0, len(prompts), size=count)
    draws = kinds.random(count)
    routed = variants.random(count) < mix.routed
    streamed = variants.random(count) < mix.stream
    bad_names = list(BAD_STATUS)
    bad_picks = variants.integers(0, len(bad_names), size=count)
    planned = []
    for i in range(count):
        kind: Kind = (
            "bad" if draws[i] < mix.bad else "cancel" if draws[i] < mix.bad + mix.cancel else "good"
        )
        model = "coe" if routed[i] else experts_drawn[i]
        stream = kind == "cancel" or (kind == "good" and bool(streamed[i]))
        if kind == "bad":
            variant = bad_names[int(bad_picks[i])]
            model = f"no-such-expert-{i}" if variant == "unknown-model" else "coe"
        else:
            variant = ("routed" if routed[i] else "named") + ("-stream" if stream else "")
        planned.append(SoakRequest(i, at[i], kind, variant, model, prompts[int(chosen[i])], stream))
    return planned


def request_payload(request: SoakRequest, max_tokens: int, limits: Limits) -> bytes:
    """The exact bytes a bad or cancelled request sends (good ones use the harness's body).
    A cancel asks for `max_tokens` too, capped by the server's limit."""
    messages = [{"role": "user", "content": request.prompt}]
    body: Any = {"model": request.model, "messages": messages, "max_tokens": max_tokens}
    if request.variant == "invalid-json":
        return _INVALID_JSON[request.index % len(_INVALID_JSON)]
    if request.variant == "wrong-types":
        body = _WRONG_TYPES[request.index % len(_WRONG_TYPES)]
    elif request.variant == "prompt-too-long":
        repeats = limits.max_prompt_chars // max(1, len(request.prompt)) + 1
        long_prompt = (request.prompt * repeats)[: limits.max_prompt_chars] + "?"
        body["messages"] = [{"role": "user", "content": long_prompt}]
    elif request.variant == "max-tokens-over-limit":
        body["max_tokens"] = limits.max_tokens_limit + 1
    elif request.kind == "cancel":
        body["stream"] = True
        body["max_tokens"] = min(max_tokens, limits.max_tokens_limit)
    return json.dumps(body).encode()


# --- outcomes (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class SoakOutcome:
    index: int
    kind: Kind
    variant: str
    result: Result
    status: int | None
    total_s: float
    ttft_s: float | None = None
    error: str | None = None


def classify_good(request: SoakRequest, outcome: Outcome) -> Result:
    if outcome.ok:
        named = request.model != "coe"
        wrong = named and outcome.served_by is not None and outcome.served_by != request.model
        return "wrong_expert" if wrong else "ok"
    if outcome.error_kind == "http_429":
        return "overloaded"
    if outcome.error_kind in ("http_4xx", "http_5xx"):
        return "unexpected_status"
    return "transport"


def classify_bad(variant: str, status: int, has_error_body: bool) -> Result:
    if status == 429:
        return "overloaded"
    return "ok" if status == BAD_STATUS[variant] and has_error_body else "unexpected_status"


def classify_cancel(status: int | None, saw_chunk: bool, transport_error: bool) -> Result:
    if status == 429:
        return "overloaded"
    if status is not None and status != 200:
        return "unexpected_status"
    return "ok" if saw_chunk and not transport_error else "transport"


# --- memory ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySample:
    t_s: float
    # The application's replicas: summed PSS outside Ray's object store. Replicas bound
    # zero-copy map experts' weights in the store, and their PSS grows as they touch more
    # of those pages; the store's bytes are counted once, in `object_store_bytes`.
    replica_bytes: int
    serve_system_bytes: int  # Serve's proxy and controller (summed PSS)
    object_store_bytes: int | None  # Ray's object store on this node; None: not measured
    # The same replicas' PSS of object-store pages (not in the total: counted above).
    replica_store_bytes: int = 0
    # `replica_bytes` per deployment, to tell which replicas grow.
    replica_by_deployment: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.replica_bytes + self.serve_system_bytes + (self.object_store_bytes or 0)


# --- the report (pure) ---------------------------------------------------------------


def memory_report(samples: Sequence[MemorySample]) -> dict[str, Any]:
    if not samples:
        return {"start": None, "end": None, "growth_bytes": None, "samples": []}
    first, last = samples[0], samples[-1]

    def view(sample: MemorySample) -> dict[str, Any]:
        return {**asdict(sample), "total_bytes": sample.total_bytes}

    growth = last.total_bytes - first.total_bytes
    return {
        "start": view(first),
        "end": view(last),
        "growth_bytes": growth,
        "growth_fraction": growth / first.total_bytes if first.total_bytes else None,
        "replica_growth_bytes": last.replica_bytes - first.replica_bytes,
        "replica_growth_by_deployment": {
            name: last.replica_by_deployment.get(name, 0) - first.replica_by_deployment.get(name, 0)
            for name in sorted({*first.replica_by_deployment, *last.replica_by_deployment})
        },
        "peak_total_bytes": max(s.total_bytes for s in samples),
        "samples": [view(s) for s in samples],
    }


def summarise(
    outcomes: Sequence[SoakOutcome], wall_s: float, samples: Sequence[MemorySample]
) -> dict[str, Any]:
    """The JSON-ready report of a soak run."""
    by_kind = Counter(o.kind for o in outcomes)
    results = {k: Counter(o.result for o in outcomes if o.kind == k) for k in KINDS}
    statuses = {
        k: Counter(str(o.status) for o in outcomes if o.kind == k and o.status is not None)
        for k in KINDS
    }
    good = [o for o in outcomes if o.kind == "good" and o.result == "ok"]
    ttfts = [o.ttft_s for o in good if o.ttft_s is not None and o.variant.endswith("-stream")]
    failures = [o for o in outcomes if o.result in FAILURES]
    bad = [o for o in outcomes if o.kind == "bad"]
    return {
        "requests": len(outcomes),
        "by_kind": {k: by_kind.get(k, 0) for k in KINDS},
        "by_variant": dict(sorted(Counter(f"{o.kind}/{o.variant}" for o in outcomes).items())),
        "results": {k: {r: results[k].get(r, 0) for r in RESULTS} for k in KINDS},
        "statuses": {k: dict(sorted(statuses[k].items())) for k in KINDS},
        "failures": len(failures),
        "failure_examples": [asdict(o) for o in failures[:_EXAMPLES]],
        "bad_refused_as_expected": sum(o.result == "ok" for o in bad),
        "overloaded": sum(o.result == "overloaded" for o in outcomes),
        "wall_s": wall_s,
        "achieved_rps": len(outcomes) / wall_s if wall_s > 0 else 0.0,
        "good_latency": {
            **{f"p{q}_s": stats.percentile([o.total_s for o in good], q) for q in (50, 99)},
            **{f"ttft_p{q}_s": stats.percentile(ttfts, q) for q in (50, 99)},
        },
        "memory": memory_report(samples),
    }
