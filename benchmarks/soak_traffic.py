"""The soak's traffic and memory: one request of each kind sent and timed, the open loop
that sends a plan, and the cluster's memory sampled on this machine.

Good requests go through the load harness's client; bad ones post their bytes and
check the refusal; a cancel reads a stream up to its first content chunk and closes
the connection. Every request is bounded by the timeout, and a failure is an outcome,
never an exception.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm

from benchmarks.harness import client as harness_client
from benchmarks.harness import workload
from benchmarks.harness.client import CHAT_PATH
from benchmarks.harness.memory import replica_memory
from benchmarks.soak_plan import (
    FAILURES,
    Limits,
    MemorySample,
    SoakOutcome,
    SoakRequest,
    classify_bad,
    classify_cancel,
    classify_good,
    request_payload,
)

SERVE_SYSTEM_PREFIXES = ("ray::ProxyActor", "ray::ServeController")
_MESSAGE_CHARS = 300


# --- memory ---------------------------------------------------------------------------


def serve_system_memory_bytes() -> int:
    """Summed PSS of Serve's proxy and controller processes."""
    import psutil

    total = 0
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if cmdline and cmdline[0].startswith(SERVE_SYSTEM_PREFIXES):
            try:
                total += int(process.memory_full_info().pss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return total


def object_store_bytes(ray_address: str | None) -> int | None:
    """Bytes used in the Ray object store, asked of the raylet the way `ray memory
    --stats-only` does: through this process's own Ray when it is a driver, else through
    `ray_address` (no driver is started); None when neither is there or it cannot answer."""
    try:
        import ray

        from cluster.serve.ray_internals import object_store_bytes_used

        if ray.is_initialized():
            ray_address = ray.get_runtime_context().gcs_address
        if ray_address is None:
            return None
        return object_store_bytes_used(ray_address, timeout_s=10.0)
    except Exception:  # no cluster there, or it went away: the figure is missing, not fatal
        return None


def sample_memory(app_name: str, ray_address: str | None, t_s: float) -> MemorySample:
    replicas = replica_memory(app_name)
    return MemorySample(
        t_s=t_s,
        replica_bytes=replicas.pss_outside_store_bytes,
        serve_system_bytes=serve_system_memory_bytes(),
        object_store_bytes=object_store_bytes(ray_address),
        replica_store_bytes=replicas.pss_bytes - replicas.pss_outside_store_bytes,
        replica_by_deployment=dict(replicas.outside_store_by_deployment),
    )


# --- sending --------------------------------------------------------------------------


def _error_body(raw: bytes) -> bool:
    try:
        body = json.loads(raw)
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


async def _send_bad(
    http: httpx.AsyncClient, url: str, request: SoakRequest, payload: bytes, headers: dict[str, str]
) -> SoakOutcome:
    start = time.monotonic()
    response = await http.post(
        url + CHAT_PATH, content=payload, headers={**headers, "content-type": "application/json"}
    )
    result = classify_bad(request.variant, response.status_code, _error_body(response.content))
    error = None if result == "ok" else response.text[:_MESSAGE_CHARS]
    elapsed = time.monotonic() - start
    return SoakOutcome(
        request.index, "bad", request.variant, result, response.status_code, elapsed, error=error
    )


async def _send_cancel(
    http: httpx.AsyncClient, url: str, request: SoakRequest, payload: bytes, headers: dict[str, str]
) -> SoakOutcome:
    """Stream, read up to the first content chunk (or the end), then close the connection."""
    start = time.monotonic()
    status, saw_chunk, error, ttft = None, False, None, None
    headers = {**headers, "content-type": "application/json"}
    async with http.stream("POST", url + CHAT_PATH, content=payload, headers=headers) as response:
        status = response.status_code
        if status != 200:
            error = (await response.aread()).decode("utf-8", "replace")[:_MESSAGE_CHARS]
        else:
            async for line in response.aiter_lines():
                data = line[len("data:") :].strip() if line.startswith("data:") else None
                if data is None:
                    continue
                if data == "[DONE]":
                    saw_chunk = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = data[:_MESSAGE_CHARS]
                    break
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    saw_chunk, ttft = True, time.monotonic() - start
                    break
            if not saw_chunk and error is None:
                error = "stream ended before its first content chunk"
    result = classify_cancel(status, saw_chunk, error is not None)
    elapsed = time.monotonic() - start
    return SoakOutcome(
        request.index, "cancel", request.variant, result, status, elapsed, ttft, error
    )


async def send_one(
    http: httpx.AsyncClient,
    url: str,
    request: SoakRequest,
    max_tokens: int,
    limits: Limits,
    timeout_s: float,
    headers: dict[str, str],
    cancel_max_tokens: int = 128,
) -> SoakOutcome:
    """One request of any kind; a failure is an outcome, never an exception. A cancel asks
    for `cancel_max_tokens`, so the server is still generating when the client hangs up."""
    if request.kind == "good":
        planned = workload.Planned(
            request.index, request.at_s, request.model, request.prompt, request.stream
        )
        outcome = await harness_client.send(
            http, url, planned, max_tokens, timeout_s, headers, model=request.model
        )
        result = classify_good(request, outcome)
        return SoakOutcome(
            request.index,
            "good",
            request.variant,
            result,
            outcome.status,
            outcome.total_s,
            outcome.ttft_s,
            outcome.error,
        )
    asked = cancel_max_tokens if request.kind == "cancel" else max_tokens
    payload = request_payload(request, asked, limits)
    start = time.monotonic()
    try:
        send = _send_bad if request.kind == "bad" else _send_cancel
        return await asyncio.wait_for(send(http, url, request, payload, headers), timeout_s)
    except Exception as error:  # timeouts, resets, malformed events: all recorded
        message = f"{type(error).__name__}: {error}"[:_MESSAGE_CHARS]
        elapsed = time.monotonic() - start
        return SoakOutcome(
            request.index, request.kind, request.variant, "transport", None, elapsed, error=message
        )


# --- the run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the soak sends and what it needs to know about the server there."""

    url: str
    app_name: str
    limits: Limits
    headers: dict[str, str]
    ray_address: str | None


async def fetch_experts(http: httpx.AsyncClient, target: Target) -> list[str]:
    response = await http.get(target.url + "/v1/models", headers=target.headers)
    response.raise_for_status()
    return [m["id"] for m in response.json()["data"] if m["id"] != "coe"]


async def warm_up(
    http: httpx.AsyncClient, target: Target, experts: Sequence[str], timeout_s: float
) -> None:
    """One request per expert and one routed, so first-use costs stay out of the figures."""
    for index, model in enumerate([*experts, "coe"]):
        planned = workload.Planned(index, 0.0, model, "Hello", False)
        outcome = await harness_client.send(
            http, target.url, planned, 4, timeout_s, target.headers, model=model
        )
        if not outcome.ok:
            raise RuntimeError(f"warm-up request to {model!r} failed: {outcome.error}")


def _not_sent(request: SoakRequest) -> SoakOutcome:
    return SoakOutcome(
        request.index, request.kind, request.variant, "not_sent", None, 0.0, error="client bound"
    )


def _timed_out(request: SoakRequest, timeout_s: float) -> SoakOutcome:
    return SoakOutcome(
        request.index,
        request.kind,
        request.variant,
        "transport",
        None,
        timeout_s,
        error="cancelled past the timeout",
    )


async def _sample_every(
    target: Target, interval_s: float, start: float, samples: list[MemorySample], bar: Any
) -> None:
    while True:
        await asyncio.sleep(interval_s)
        sample = await asyncio.to_thread(
            sample_memory, target.app_name, target.ray_address, time.monotonic() - start
        )
        samples.append(sample)
        bar.write(f"t={sample.t_s:.0f}s memory {sample.total_bytes / 1e9:.3f} GB", file=sys.stderr)


async def soak(
    target: Target,
    plan: Sequence[SoakRequest],
    *,
    max_tokens: int,
    timeout_s: float,
    sample_s: float,
    cancel_max_tokens: int = 128,
    max_in_flight: int = 256,
    progress: bool = True,
) -> tuple[list[SoakOutcome], float, list[MemorySample]]:
    """Send `plan` open-loop; every request bounded by `timeout_s`. Returns the outcomes
    (in plan order), the wall time of the traffic and the memory samples."""
    outcomes: list[SoakOutcome] = []
    failed = Counter[str]()
    bar = tqdm(total=len(plan), unit="req", file=sys.stderr, disable=not progress, leave=False)

    def record(outcome: SoakOutcome) -> None:
        outcomes.append(outcome)
        failed[outcome.result] += outcome.result in FAILURES
        bar.set_postfix(failures=sum(failed.values()), refresh=False)
        bar.update(1)

    samples = [await asyncio.to_thread(sample_memory, target.app_name, target.ray_address, 0.0)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=timeout_s) as http:
        start = time.monotonic()
        sampler = asyncio.create_task(_sample_every(target, sample_s, start, samples, bar))
        tasks: dict[asyncio.Task[SoakOutcome], SoakRequest] = {}

        def finished(done: asyncio.Task[SoakOutcome]) -> None:
            # A task cancelled past its bound was recorded when it was cancelled.
            if tasks.pop(done, None) is not None and not done.cancelled():
                record(done.result())

        try:
            for request in plan:
                delay = start + request.at_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(tasks) >= max_in_flight:
                    record(_not_sent(request))
                    continue
                task = asyncio.create_task(
                    send_one(
                        http,
                        target.url,
                        request,
                        max_tokens,
                        target.limits,
                        timeout_s,
                        target.headers,
                        cancel_max_tokens,
                    )
                )
                tasks[task] = request
                task.add_done_callback(finished)
            if tasks:
                await asyncio.wait(list(tasks), timeout=timeout_s + 1.0)
            for task, request in list(tasks.items()):
                task.cancel()  # outlived its own bound: recorded as a transport timeout
                tasks.pop(task, None)
                record(_timed_out(request, timeout_s))
            wall_s = time.monotonic() - start
        finally:
            sampler.cancel()
            for task in tasks:  # only when the run itself failed
                task.cancel()
            await asyncio.gather(sampler, *tasks, return_exceptions=True)
            bar.close()
    end = await asyncio.to_thread(
        sample_memory, target.app_name, target.ray_address, time.monotonic() - start
    )
    samples.append(end)
    return sorted(outcomes, key=lambda o: o.index), wall_s, samples
