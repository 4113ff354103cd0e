"""Request traces for the tier simulator: arrival time, expert, optional output tokens.

Traces load from JSONL (one object per line: {"arrival_s": 0.5, "expert": "law",
"output_tokens": 64}) or CSV (a header with `arrival_s`, `expert` and optionally
`output_tokens`), and are generated (uniform or Zipf over N experts, seeded, Poisson
arrivals). Requests are returned sorted by arrival (stable), so a log written out of
order replays in time order; every bad row is an error naming file, line and value.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FIELDS = ("arrival_s", "expert", "output_tokens")


class TraceError(ValueError):
    """A trace that cannot be used; the message names the file, line and bad value."""


@dataclass(frozen=True)
class Request:
    """One request of a trace."""

    arrival_s: float
    expert: str
    output_tokens: int | None = None


def _request(row: Mapping[str, Any], where: str) -> Request:
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise TraceError(f"{where}: unknown field(s) {unknown}; fields are {list(FIELDS)}")
    for field in ("arrival_s", "expert"):
        if field not in row or row[field] in (None, ""):
            raise TraceError(f"{where}: missing {field!r}")
    raw_arrival = row["arrival_s"]
    if isinstance(raw_arrival, bool):
        raise TraceError(f"{where}: arrival_s must be a number, got {raw_arrival!r}")
    try:
        arrival = float(raw_arrival)
    except (TypeError, ValueError):
        raise TraceError(f"{where}: arrival_s must be a number, got {raw_arrival!r}") from None
    if not math.isfinite(arrival) or arrival < 0:
        raise TraceError(f"{where}: arrival_s must be finite and >= 0, got {raw_arrival!r}")
    expert = row["expert"]
    if not isinstance(expert, str) or not expert.strip():
        raise TraceError(f"{where}: expert must be a non-empty string, got {expert!r}")
    tokens = row.get("output_tokens")
    if tokens in (None, ""):
        return Request(arrival, expert.strip(), None)
    if isinstance(tokens, bool) or (isinstance(tokens, float) and not tokens.is_integer()):
        raise TraceError(f"{where}: output_tokens must be an integer >= 0, got {tokens!r}")
    try:
        count = int(tokens)
    except (TypeError, ValueError):
        raise TraceError(
            f"{where}: output_tokens must be an integer >= 0, got {tokens!r}"
        ) from None
    if count < 0:
        raise TraceError(f"{where}: output_tokens must be an integer >= 0, got {tokens!r}")
    return Request(arrival, expert.strip(), count)


def _finish(requests: list[Request], source: str) -> list[Request]:
    if not requests:
        raise TraceError(f"{source}: the trace has no requests")
    return sorted(requests, key=lambda request: request.arrival_s)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise TraceError(f"cannot read trace {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise TraceError(f"trace {path} is not UTF-8 text: {error}") from None


def load_jsonl(path: str | Path) -> list[Request]:
    """Read a JSONL trace; blank lines are skipped."""
    source = Path(path)
    requests = []
    for number, line in enumerate(_read(source).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TraceError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise TraceError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
        requests.append(_request(row, where))
    return _finish(requests, str(source))


def load_csv(path: str | Path) -> list[Request]:
    """Read a CSV trace with a header row naming its columns."""
    source = Path(path)
    reader = csv.DictReader(_read(source).splitlines())
    header = reader.fieldnames or []
    missing = [field for field in ("arrival_s", "expert") if field not in header]
    if missing:
        raise TraceError(f"{source}:1: header {header} lacks column(s) {missing}")
    requests = []
    for row in reader:
        where = f"{source}:{reader.line_num}"
        if None in row:
            raise TraceError(f"{where}: more values than header columns: {row[None]!r}")
        requests.append(_request(row, where))
    return _finish(requests, str(source))


def load_trace(path: str | Path) -> list[Request]:
    """A trace by file suffix: .jsonl / .json (JSON lines) or .csv."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return load_jsonl(path)
    if suffix == ".csv":
        return load_csv(path)
    raise TraceError(f"trace {path}: unknown format {suffix!r}; use .jsonl or .csv")


def write_jsonl(requests: Iterable[Request], path: str | Path) -> Path:
    """Write a trace as JSONL (output_tokens omitted when unset)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for request in requests:
        row: dict[str, Any] = {"arrival_s": request.arrival_s, "expert": request.expert}
        if request.output_tokens is not None:
            row["output_tokens"] = request.output_tokens
        lines.append(json.dumps(row))
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def expert_names(count: int) -> list[str]:
    """Generated expert names, zero-padded so they sort in rank order."""
    if count < 1:
        raise ValueError(f"the number of experts must be >= 1, got {count}")
    width = max(3, len(str(count - 1)))
    return [f"expert-{index:0{width}d}" for index in range(count)]


def zipf_probabilities(count: int, s: float) -> np.ndarray:
    """P(rank k) proportional to 1 / k**s for k = 1..count (s = 0 is uniform)."""
    if count < 1:
        raise ValueError(f"the number of experts must be >= 1, got {count}")
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(f"zipf exponent s must be finite and >= 0, got {s!r}")
    weights = 1.0 / np.arange(1, count + 1, dtype=np.float64) ** s
    return np.asarray(weights / weights.sum())


def _generate(
    experts: Sequence[str],
    probabilities: np.ndarray,
    n_requests: int,
    rate_per_s: float,
    seed: int,
    output_tokens: int | None,
) -> list[Request]:
    if n_requests < 1:
        raise ValueError(f"n_requests must be >= 1, got {n_requests}")
    if not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate_per_s must be a positive finite number, got {rate_per_s!r}")
    if output_tokens is not None and output_tokens < 0:
        raise ValueError(f"output_tokens must be >= 0, got {output_tokens}")
    rng = np.random.default_rng(seed)
    # Poisson arrivals: exponential gaps with mean 1 / rate.
    arrivals = np.cumsum(rng.exponential(1.0 / rate_per_s, size=n_requests))
    picks = rng.choice(len(experts), size=n_requests, p=probabilities)
    return [
        Request(float(arrival), experts[int(pick)], output_tokens)
        for arrival, pick in zip(arrivals, picks, strict=True)
    ]


def uniform_trace(
    n_requests: int,
    experts: Sequence[str] | int,
    *,
    rate_per_s: float = 1.0,
    seed: int = 0,
    output_tokens: int | None = None,
) -> list[Request]:
    """Every expert equally likely; Poisson arrivals at `rate_per_s`."""
    names = expert_names(experts) if isinstance(experts, int) else list(experts)
    if not names:
        raise ValueError("experts must not be empty")
    uniform = np.full(len(names), 1.0 / len(names))
    return _generate(names, uniform, n_requests, rate_per_s, seed, output_tokens)


def zipf_trace(
    n_requests: int,
    experts: Sequence[str] | int,
    s: float = 1.0,
    *,
    rate_per_s: float = 1.0,
    seed: int = 0,
    output_tokens: int | None = None,
) -> list[Request]:
    """Expert of rank k (its position in `experts`) drawn with P proportional to 1/k**s."""
    names = expert_names(experts) if isinstance(experts, int) else list(experts)
    if not names:
        raise ValueError("experts must not be empty")
    probabilities = zipf_probabilities(len(names), s)
    return _generate(names, probabilities, n_requests, rate_per_s, seed, output_tokens)
