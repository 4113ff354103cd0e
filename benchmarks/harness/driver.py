"""Send a `Workload` to a server and collect every `Outcome`; stops by itself.

    result = run_sync(workload, "http://127.0.0.1:8000", max_tokens=32, timeout_s=30.0,
                      duration_s=120.0, on_tick=sample_replicas)

Open loop: each request starts at its planned `at_s`, whether or not earlier ones have
been answered (one asyncio task each). More than `max_in_flight` unanswered requests
means the client itself would become the bottleneck, so a request planned beyond that
bound is not sent and counts as an error of kind `client_overload`.

Closed loop: `concurrency` users (default: the workload's) each take the next planned
request, send it, wait for the answer, and repeat.

The run ends when the workload is exhausted or `duration_s` has passed; after that no
new request is sent and the ones in flight are awaited, each for at most `timeout_s`
(every request has that limit anyway). `on_tick(elapsed_s)` runs in a worker thread at
the start and then every `tick_s` seconds while requests are being sent or awaited, one
call at a time, so a slow sampler does not delay sends; the run waits for a tick in
progress before it returns, and an exception raised by `on_tick` stops the run and is
raised to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from tqdm import tqdm

from benchmarks.harness.client import Outcome, check_loopback, send
from benchmarks.harness.workload import LoopMode, Planned, Workload, WorkloadError

DEFAULT_MAX_IN_FLIGHT = 1024
# Requests are bounded by their own timeout; this is slack on top of it before a task
# that somehow outlives it is cancelled and recorded as a timeout.
_AWAIT_SLACK_S = 1.0

# httpx's connection pool scans all of its connections for every request, so a single
# pool with hundreds of open connections costs the client milliseconds per request and
# the client, not the server, sets the latency. Requests are spread over several pools
# of about this many connections each.
_REQUESTS_PER_POOL = 32

StopReason = Literal["exhausted", "duration"]


@dataclass(frozen=True)
class RunResult:
    """Every outcome (in planned order) and the run's rates.

    `offered_rps`: planned requests per planned second within the run's bound (open loop;
    None for a closed loop). `achieved_rps`: successful answers per wall-clock second."""

    outcomes: tuple[Outcome, ...]
    wall_s: float
    offered_rps: float | None
    achieved_rps: float
    mode: LoopMode
    planned: int  # requests in the workload
    unsent: int  # planned but never sent because the duration bound came first
    peak_in_flight: int
    stopped_by: StopReason
    # `time.monotonic()` when the run started: an outcome's `started_s` counts from it,
    # so samples taken beside the run (residency, memory) line up with its requests.
    start_monotonic: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The scalars (outcomes left out; see `stats.summarise`)."""
        return {
            "wall_s": self.wall_s,
            "offered_rps": self.offered_rps,
            "achieved_rps": self.achieved_rps,
            "mode": self.mode,
            "planned": self.planned,
            "unsent": self.unsent,
            "peak_in_flight": self.peak_in_flight,
            "stopped_by": self.stopped_by,
        }


@dataclass
class _Run:
    clients: list[httpx.AsyncClient]
    base_url: str
    start: float
    max_tokens: int
    timeout_s: float
    headers: Mapping[str, str] | None
    model: str | None
    bar: Any
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    errors: int = 0
    stopped_by: StopReason = "exhausted"
    wall_s: float = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.errors += not outcome.ok
        self.bar.set_postfix(errors=self.errors, in_flight=self.in_flight, refresh=False)
        self.bar.update(1)

    async def send_one(self, planned: Planned) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            outcome = await send(
                self.clients[planned.index % len(self.clients)],
                self.base_url,
                planned,
                self.max_tokens,
                self.timeout_s,
                self.headers,
                run_start=self.start,
                model=self.model,
            )
        finally:
            self.in_flight -= 1
        self.record(outcome)

    def refused(self, planned: Planned, kind: Literal["client_overload", "timeout"]) -> Outcome:
        return Outcome(
            index=planned.index,
            expert=planned.expert,
            stream=planned.stream,
            ok=False,
            status=None,
            error_kind=kind,
            started_s=self.elapsed(),
            ttft_s=None,
            total_s=0.0,
            tokens=0,
            served_by=None,
            scheduled_s=planned.at_s,
            error=f"not sent: {kind}" if kind == "client_overload" else "cancelled past timeout",
        )


async def _open_loop(
    state: _Run, requests: tuple[Planned, ...], duration_s: float | None, max_in_flight: int
) -> None:
    tasks: dict[asyncio.Task[None], Planned] = {}
    for planned in requests:
        at_s = planned.at_s if planned.at_s is not None else 0.0
        if duration_s is not None and at_s >= duration_s:
            state.stopped_by = "duration"
            break
        delay = state.start + at_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if duration_s is not None and state.elapsed() >= duration_s:
            state.stopped_by = "duration"  # the client fell behind its own schedule
            break
        if len(tasks) >= max_in_flight:
            state.record(state.refused(planned, "client_overload"))
            continue
        task = asyncio.create_task(state.send_one(planned))
        tasks[task] = planned
        task.add_done_callback(lambda done: tasks.pop(done, None))
    if not tasks:
        return
    _, pending = await asyncio.wait(list(tasks), timeout=state.timeout_s + _AWAIT_SLACK_S)
    for task in pending:
        task.cancel()
        state.record(state.refused(tasks[task], "timeout"))
    await asyncio.gather(*pending, return_exceptions=True)


async def _closed_loop(
    state: _Run, requests: tuple[Planned, ...], duration_s: float | None, users: int
) -> None:
    queue = iter(requests)  # shared: each user takes the next request when it is free

    async def user() -> None:
        for planned in queue:
            if duration_s is not None and state.elapsed() >= duration_s:
                state.stopped_by = "duration"
                return
            await state.send_one(planned)

    await asyncio.gather(*(user() for _ in range(users)))


async def _timed(state: _Run, main: Coroutine[Any, Any, None]) -> None:
    try:
        await main
    finally:
        state.wall_s = state.elapsed()


async def _tick(
    on_tick: Callable[[float], None], tick_s: float, start: float, stop: asyncio.Event
) -> None:
    ticks = 0
    while not stop.is_set():
        await asyncio.to_thread(on_tick, time.monotonic() - start)
        ticks += 1
        # Fixed schedule; ticks missed while a slow call ran are skipped, not bunched.
        ticks = max(ticks, math.ceil((time.monotonic() - start) / tick_s))
        delay = start + ticks * tick_s - time.monotonic()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(delay, 0.0))


@contextlib.asynccontextmanager
async def _client_pools(in_flight: int, timeout_s: float) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Enough HTTP clients for `in_flight` concurrent requests. Connections are not
    capped here (the driver bounds what is in flight), so no request waits for one."""
    count = max(1, math.ceil(in_flight / _REQUESTS_PER_POOL))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=_REQUESTS_PER_POOL)
    ssl_context = httpx.create_ssl_context()  # slow to build: one for every client
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    trust_env=False,  # never through a proxy from the environment
                    limits=limits,
                    timeout=httpx.Timeout(timeout_s),
                    verify=ssl_context,
                )
            )
            for _ in range(count)
        ]
        yield clients


def _check_arguments(
    workload: Workload,
    max_tokens: int,
    timeout_s: float,
    duration_s: float | None,
    concurrency: int | None,
    tick_s: float,
    max_in_flight: int,
) -> None:
    if len(workload) == 0:
        raise WorkloadError("the workload plans no request")
    if max_tokens < 1:
        raise WorkloadError(f"max_tokens must be at least 1, got {max_tokens}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise WorkloadError(f"timeout must be a finite number of seconds > 0, got {timeout_s}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise WorkloadError(f"duration must be a finite number of seconds > 0, got {duration_s}")
    if not (math.isfinite(tick_s) and tick_s > 0):
        raise WorkloadError(f"tick interval must be a finite number of seconds > 0, got {tick_s}")
    if max_in_flight < 1:
        raise WorkloadError(f"max_in_flight must be at least 1, got {max_in_flight}")
    if workload.mode == "open" and concurrency is not None:
        raise WorkloadError("concurrency is the number of closed-loop users; this is an open loop")
    if workload.mode == "closed":
        users = concurrency if concurrency is not None else workload.users
        if users is None or users < 1:
            raise WorkloadError(f"closed loop needs at least one user, got {users}")


def _offered_rps(workload: Workload, duration_s: float | None) -> float | None:
    if workload.mode != "open" or workload.span_s is None:
        return None
    span = workload.span_s if duration_s is None else min(workload.span_s, duration_s)
    within = sum(1 for p in workload.requests if duration_s is None or (p.at_s or 0.0) < duration_s)
    return within / span if span > 0 else None


async def run(
    workload: Workload,
    base_url: str,
    *,
    max_tokens: int = 64,
    timeout_s: float = 60.0,
    duration_s: float | None = None,
    concurrency: int | None = None,
    progress: bool = True,
    on_tick: Callable[[float], None] | None = None,
    tick_s: float = 1.0,
    headers: Mapping[str, str] | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    model: str | None = None,
) -> RunResult:
    """Run `workload` against `base_url` (loopback only; checked before anything is sent).

    `concurrency`: closed-loop users (default `workload.users`); not allowed for an open
    loop. `model`: sent instead of each request's expert as the body's `model`
    (e.g. "coe" to let the cluster route)."""
    url = check_loopback(base_url)
    _check_arguments(
        workload, max_tokens, timeout_s, duration_s, concurrency, tick_s, max_in_flight
    )
    users = (concurrency or workload.users or 1) if workload.mode == "closed" else max_in_flight
    bar = tqdm(total=len(workload), unit="req", file=sys.stderr, disable=not progress, leave=False)
    try:
        async with _client_pools(users, timeout_s) as clients:
            state = _Run(clients, url, time.monotonic(), max_tokens, timeout_s, headers, model, bar)
            if workload.mode == "open":
                main = _open_loop(state, workload.requests, duration_s, max_in_flight)
            else:
                main = _closed_loop(state, workload.requests, duration_s, users)
            await _with_ticker(_timed(state, main), on_tick, tick_s, state.start)
    finally:
        bar.close()
    outcomes = tuple(sorted(state.outcomes, key=lambda o: o.index))
    ok = sum(o.ok for o in outcomes)
    wall_s = state.wall_s
    return RunResult(
        outcomes=outcomes,
        wall_s=wall_s,
        offered_rps=_offered_rps(workload, duration_s),
        achieved_rps=ok / wall_s if wall_s > 0 else 0.0,
        mode=workload.mode,
        planned=len(workload),
        unsent=len(workload) - len(outcomes),
        peak_in_flight=state.peak_in_flight,
        stopped_by=state.stopped_by,
        start_monotonic=state.start,
    )


async def _with_ticker(
    main: Coroutine[Any, Any, None],
    on_tick: Callable[[float], None] | None,
    tick_s: float,
    start: float,
) -> None:
    """Await `main` while `on_tick` samples; a failing `on_tick` cancels `main`."""
    main_task: asyncio.Task[None] = asyncio.ensure_future(main)
    if on_tick is None:
        await main_task
        return
    stop = asyncio.Event()
    ticker = asyncio.ensure_future(_tick(on_tick, tick_s, start, stop))
    try:
        await asyncio.wait({main_task, ticker}, return_when=asyncio.FIRST_COMPLETED)
        if ticker.done() and not main_task.done():
            main_task.cancel()
            await asyncio.gather(main_task, return_exceptions=True)
            ticker.result()  # raises what on_tick raised
        await main_task
    finally:
        stop.set()
        main_task.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
    ticker.result()


def run_sync(
    workload: Workload,
    base_url: str,
    *,
    max_tokens: int = 64,
    timeout_s: float = 60.0,
    duration_s: float | None = None,
    concurrency: int | None = None,
    progress: bool = True,
    on_tick: Callable[[float], None] | None = None,
    tick_s: float = 1.0,
    headers: Mapping[str, str] | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    model: str | None = None,
) -> RunResult:
    """`run` in a fresh event loop, for callers that are not async."""
    return asyncio.run(
        run(
            workload,
            base_url,
            max_tokens=max_tokens,
            timeout_s=timeout_s,
            duration_s=duration_s,
            concurrency=concurrency,
            progress=progress,
            on_tick=on_tick,
            tick_s=tick_s,
            headers=headers,
            max_in_flight=max_in_flight,
            model=model,
        )
    )
