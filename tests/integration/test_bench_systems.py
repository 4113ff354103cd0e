"""Every system the load harness starts answers real requests and is stopped cleanly.

The three systems of `benchmarks.compare` (coe, multiplex, resident) run one after the
other beside the demo application, with two small Llama experts; the harness drives
a short closed loop against each (streaming and not), then the system is stopped and
must leave no application, no replica process and no arena behind.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from actors.weights.synthetic import build_tiny_expert
from benchmarks.compare import warm_up
from benchmarks.harness import driver, stats, workload
from benchmarks.systems import APP_NAME, SYSTEMS, Scenario, running
from tests.integration.conftest import RunningCluster
from tests.integration.test_tiers import demo_tokenizer_dir

pytestmark = pytest.mark.integration

PREFIX = "/bench"


@pytest.fixture(scope="module")
def scenario(
    demo_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Scenario:
    root = tmp_path_factory.mktemp("bench")
    source = build_tiny_expert(root / "source", 7, demo_tokenizer_dir())
    scenario = Scenario(
        experts=2, hbm_experts=1, checkpoint=source, copies_dir=root / "experts", max_models=1
    )
    scenario.prepare(lambda _: None)
    return scenario


def replica_processes() -> list[psutil.Process]:
    prefix = f"ray::ServeReplica:{APP_NAME}:"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if cmdline and cmdline[0].startswith(prefix):
            found.append(process)
    return found


@pytest.mark.parametrize("name", SYSTEMS)
def test_system_serves_the_harness_and_stops_cleanly(
    name: str, cluster: RunningCluster, scenario: Scenario
) -> None:
    from ray import serve

    base_url = cluster.base_url + PREFIX
    plan = workload.closed_loop(
        ["Hello there", "What is two plus two?"],
        scenario.names,
        users=2,
        count=8,
        zipf_s=1.0,
        stream_fraction=0.5,
        seed=3,
    )
    with running(name, scenario, lambda _: None, route_prefix=PREFIX) as system:
        warm_up(scenario, base_url, max_tokens=4)
        result = driver.run_sync(plan, base_url, max_tokens=4, timeout_s=120, progress=False)
        summary = stats.summarise(result, slo_s=120.0)
        measured = system.stats(len(result.outcomes))
        assert len(replica_processes()) >= 2
    assert summary["ok"] == 8, summary["errors"]
    assert {o.served_by for o in result.outcomes} <= set(scenario.names)
    assert all(o.served_by == o.expert for o in result.outcomes)
    assert summary["stream_requests"] > 0
    if name == "multiplex":
        assert measured["largest_batch"] == 1 and measured["batches"] is None
    else:  # every request (and each warm-up) went through an expert's batcher
        assert measured["batched_requests"] >= summary["ok"]
        assert measured["batches"] <= measured["batched_requests"]
    if name == "coe":
        # Two experts through a device budget of one: the tiers switched.
        assert measured["switches"] >= 2
        assert measured["peak_memory_bytes"] == scenario.hbm_budget_bytes
    elif name == "multiplex":
        assert measured["switches"] >= 2  # K = 1: every change of expert is a load
    else:
        assert measured["switches"] == 0 and measured["hbm_hit_rate"] == 1.0
    assert measured["peak_host_memory_bytes"] > 0
    # Stopped: no application, no replica process left, the arena given back.
    assert APP_NAME not in serve.status().applications
    deadline = time.monotonic() + 60
    while replica_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replica_processes() == []
    from cluster.serve.placement_replica import arena_files

    tiered = scenario.config(tiers=True)
    names = arena_files(tiered)
    assert not [name for name in os.listdir(tiered.tiers.arena_dir) if names.fullmatch(name)]
