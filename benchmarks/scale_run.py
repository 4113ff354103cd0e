"""One system of the scale benchmark, started, driven and stopped on one Ray instance.

`run_system` starts the system (benchmarks/systems.py), warms it (one request for each
of the most popular experts, least popular first, so every system starts holding the
same ones; `zero` is not warmed: starting from no replica is what it is), replays the
planned arrivals while a `ResidencyWatch` records what it holds, and reads its counters
before it is stopped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from benchmarks.harness import driver, stats, workload
from benchmarks.harness.client import Outcome
from benchmarks.scale_metrics import (
    ResidencyWatch,
    copy_bound_p50_s,
    counter_delta,
    object_store_stats,
    residency_split,
    resident_flags,
)
from benchmarks.systems import APP_NAME, RunningSystem, Scenario, running
from cluster.config import ServeSettings
from cluster.console import Say
from cluster.serve import lifecycle


@dataclass(frozen=True)
class RunSettings:
    """How every system is driven (one set for the whole benchmark)."""

    max_tokens: int
    timeout_s: float
    slo_s: float
    slo_ttft_s: float | None
    watch_interval_s: float
    warm_experts: int  # the most popular experts each warmed system starts with


@dataclass
class SystemRun:
    """What one system did: its summary (JSON-ready) and, per request, its outcome
    and whether its expert was held ready when it was sent."""

    summary: dict[str, Any]
    outcomes: tuple[Outcome, ...] = ()
    flags: list[bool] = field(default_factory=list)


@contextmanager
def ray_instance(port: int, object_store_bytes: int | None) -> Iterator[tuple[str, str]]:
    """A local Ray + Serve on loopback; yields (HTTP base URL, GCS address)."""
    import ray

    settings = ServeSettings(host="127.0.0.1", port=port)
    # The replicas' own log lines (an access line per residency poll among them) would
    # bury the progress; they stay in Ray's session logs.
    lifecycle.start_local_ray(object_store_memory=object_store_bytes, log_to_driver=False)
    try:
        lifecycle.start_serve(settings)
        yield lifecycle.base_url(settings), ray.get_runtime_context().gcs_address
    finally:
        lifecycle.shutdown()


def warm_up(names: Sequence[str], base_url: str, max_tokens: int) -> None:
    """One request per expert, in the order given, one at a time."""
    requests = tuple(
        workload.Planned(index=i, at_s=None, expert=name, prompt="Hello", stream=False)
        for i, name in enumerate(names)
    )
    plan = workload.Workload(requests=requests, mode="closed", seed=0, users=1)
    result = driver.run_sync(
        plan, base_url, max_tokens=max_tokens, timeout_s=300.0, concurrency=1, progress=False
    )
    failed = [o for o in result.outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"warm-up failed: {failed[0]}")


def _counters(
    system: RunningSystem, gcs_address: str, measured: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Switches so far (and the object store's spill counters, for `coe`)."""
    measured = measured or system.stats(0)
    counters: dict[str, Any] = {"switches": measured["switches"]}
    if system.name == "coe":
        counters["store"] = object_store_stats(gcs_address)
    return counters


def run_system(
    name: str,
    scenario: Scenario,
    plan: workload.Workload,
    settings: RunSettings,
    endpoints: tuple[str, str],
    say: Say,
    copy_bytes_per_s: float,
) -> SystemRun:
    """Start `name`, replay `plan` against it, summarise, stop it."""
    base_url, gcs_address = endpoints
    started = time.monotonic()
    try:
        with running(name, scenario, say) as system:
            startup_s = time.monotonic() - started
            if name != "zero":
                warm = list(reversed(scenario.names[: settings.warm_experts]))
                warm_up(warm, base_url, settings.max_tokens)
            before = _counters(system, gcs_address)
            say(f"[{name}] {len(plan)} requests, {scenario.experts} experts")
            interval = settings.watch_interval_s
            with ResidencyWatch(system.resident, interval) as watch:
                result = driver.run_sync(
                    plan,
                    base_url,
                    max_tokens=settings.max_tokens,
                    timeout_s=settings.timeout_s,
                    duration_s=(plan.span_s or 0.0) + settings.timeout_s,
                    progress=True,
                )
            measured = system.stats(len(result.outcomes))
            after = _counters(system, gcs_address, measured)
            extra = _system_extras(system)
    except Exception as error:  # one system failing must not lose the others' results
        say(f"[{name}] failed: {type(error).__name__}: {error}")
        _undeploy_quietly(scenario)
        return SystemRun({"failed": f"{type(error).__name__}: {error}"})
    assert result.start_monotonic is not None
    flags = resident_flags(result.outcomes, result.start_monotonic, watch)
    summary = _summary(result, flags, settings, measured, before, after)
    summary.update(extra, startup_s=startup_s, residency_polls=len(watch.snapshots))
    summary["per_request"] = [
        {
            "index": o.index,
            "expert": o.expert,
            "sent_s": o.started_s,
            "resident": flag,
            "ok": o.ok,
            "ttft_s": o.ttft_s,
            "total_s": o.total_s,
        }
        for o, flag in zip(result.outcomes, flags, strict=True)
    ]
    if name == "coe":
        summary["copy_bound_s"] = copy_bound_p50_s(
            result.outcomes, flags, scenario.expert_sizes(), copy_bytes_per_s
        )
    say(
        f"[{name}] ttft p50 {summary['ttft_p50_s']} s, p99 {summary['ttft_p99_s']} s, "
        f"switch overhead {summary['switch_overhead_p50_s']} s, errors {summary['errors']}"
    )
    return SystemRun(summary, result.outcomes, flags)


def _summary(
    result: driver.RunResult,
    flags: list[bool],
    settings: RunSettings,
    measured: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
) -> dict[str, Any]:
    harness = stats.summarise(result, settings.slo_s, settings.slo_ttft_s)
    summary: dict[str, Any] = {
        key: harness[key]
        for key in (
            "requests",
            "ok",
            "offered_rps",
            "achieved_rps",
            "goodput_rps",
            "ttft_p50_s",
            "ttft_p99_s",
            "p50_s",
            "p99_s",
            "send_lag_p99_s",
        )
    }
    summary["errors"] = harness["error_count"]
    summary["errors_by_kind"] = harness["errors"]
    summary.update(residency_split(result.outcomes, flags))
    summary["switches"] = after["switches"] - before["switches"]
    for key in (
        "processes",
        "peak_pss_bytes",
        "peak_pss_outside_store_bytes",
        "peak_pss_outside_store_by_deployment",
        "object_store_bytes",
        "peak_memory_bytes",
        "peak_host_memory_bytes",
    ):
        summary[key] = measured[key]
    if "store" in after:
        spills = counter_delta(after["store"], before["store"])
        summary["object_store_spills"] = spills
        # Only a switch reads an expert's object, so each object restored is a switch
        # that found its expert's bytes spilled to disk.
        summary["spilled_switches"] = spills.get("restored_objects")
    return summary


def _system_extras(system: RunningSystem) -> dict[str, Any]:
    """What only one kind of system reports: executor and multiplex replica counters."""
    if system.name == "multiplex":
        infos = system.multiplex_infos()
        return {
            "replica_loads": sum(i["loads"] for i in infos),
            "load_seconds": sum(i["load_seconds"] for i in infos),
        }
    if system.name == "coe" and system.scenario.executor_replicas is not None:
        infos = system.executor_infos()
        return {
            "executor_loads": sum(int(i.get("loads", 0)) for i in infos),
            "executor_rebinds": sum(int(i.get("rebinds", 0)) for i in infos),
        }
    if system.name == "zero":
        return {"replica_starts": system.replica_starts}
    return {}


def _undeploy_quietly(scenario: Scenario) -> None:
    # Nothing may have been deployed, or Serve may be gone: nothing to give back then.
    with contextlib.suppress(Exception):
        lifecycle.undeploy(APP_NAME, scenario.system_config("coe"))
