"""Prometheus metrics and `coe status` on the real cluster.

Ray exports application metrics through the node's metrics agent, which scrapes
the workers every few seconds: a series appears with a delay, so every check
polls the node's endpoint until a bounded deadline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import PROJECT_ROOT
from tests.integration.conftest import RunningCluster

pytestmark = pytest.mark.integration

EXPORT_DEADLINE_S = 90.0
MATH = "Solve 3x + 4 = 19 for x."


def chat(cluster: RunningCluster, model: str, prompt: str, max_tokens: int = 4) -> httpx.Response:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    }
    return httpx.post(f"{cluster.base_url}/v1/chat/completions", json=body, timeout=120)


def metrics_url() -> str:
    import ray

    node = ray._private.worker.global_worker.node
    assert node is not None, "the cluster fixture's ray.init did not run"
    return f"http://127.0.0.1:{node.metrics_export_port}/metrics"


def series(text: str, name: str, **labels: str) -> list[str]:
    """The exported samples of metric `name` that carry every given label."""
    found = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            found.append(line)
    return found


def value_of(sample: str) -> float:
    return float(sample.rsplit(" ", 1)[1])


def scrape_until(url: str, ready: Callable[[str], bool]) -> str:
    """Scrape until `ready` holds; fail with the coe_* lines seen when time runs out."""
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    text = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        if ready(text):
            return text
        time.sleep(2.0)
    seen = "\n".join(line for line in text.splitlines() if "coe_" in line)
    pytest.fail(f"metrics not exported within {EXPORT_DEADLINE_S:.0f}s; coe series:\n{seen}")


@pytest.mark.timeout(300)
def test_prometheus_shows_requests_routing_queue_and_tier_events(
    cluster: RunningCluster,
) -> None:
    routed = chat(cluster, "coe", MATH)
    assert routed.status_code == 200, routed.text
    expert, category = routed.json()["coe"]["expert"], routed.json()["coe"]["category"]
    direct = chat(cluster, "storyteller", "A moon poem.")
    assert direct.status_code == 200, direct.text
    unknown = chat(cluster, "nobody", "Hello")
    assert unknown.status_code == 404, unknown.text

    def exported(text: str) -> bool:
        return bool(
            series(text, "ray_coe_requests_total", expert=expert, category=category, status="200")
            and series(text, "ray_coe_requests_total", expert="none", status="404")
            and series(text, "ray_coe_requests_total", expert="storyteller", category="direct")
            and series(text, "ray_coe_request_latency_seconds_count", expert=expert)
            and series(text, "ray_coe_routing_confidence_count", category=category)
            and series(text, "ray_coe_expert_queue_depth", expert=expert)
            and series(text, "ray_coe_tier_events_total", event="switch_in")
            and series(text, "ray_coe_tier_bytes_copied_total")
        )

    text = scrape_until(metrics_url(), exported)
    # Both answered requests have finished: nothing of theirs is still queued.
    for sample in series(text, "ray_coe_expert_queue_depth", expert=expert):
        assert value_of(sample) == 0.0, sample
    confidence = series(text, "ray_coe_routing_confidence_count", category=category)
    assert sum(value_of(sample) for sample in confidence) >= 1
    assert all(re.search(r'fallback="(true|false)"', sample) for sample in confidence)
    assert all(value_of(s) > 0 for s in series(text, "ray_coe_tier_bytes_copied_total"))


@pytest.mark.timeout(180)
def test_coe_status_lists_the_demo_experts(cluster: RunningCluster) -> None:
    answered = chat(cluster, "generalist", "Hello", max_tokens=2)
    assert answered.status_code == 200, answered.text
    # As from another terminal: RAY_AUTH_MODE is whatever the user has, not what this
    # process's ray.init set; `address="auto"` finds the token on its own.
    env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_MODE"}
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "status", "--json", "--app", cluster.app_name],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    dedicated = {e.name for e in cluster.config.dedicated_experts()}
    assert {f"expert-{name}" for name in dedicated} <= set(status["deployments"])
    for name in dedicated:
        row = status["deployments"][f"expert-{name}"]
        assert row["status"] == "HEALTHY" and row["running"] >= 1, row
    pool = status["deployments"]["executors"]
    assert pool["status"] == "HEALTHY" and pool["running"] == cluster.config.executors.replicas
    pooled = {e.name for e in cluster.config.executor_experts()}
    assert set(status["executors"]["experts"]) == pooled
    experts = dedicated | pooled
    assert status["problems"] == []
    assert status["router"]["mode"] == cluster.config.router.routing
    assert status["stats"]["requests"]["generalist"]["200"] >= 1
    residents = [
        r["expert"] for device in status["residency"].values() for r in device["residents"]
    ]
    assert residents and set(residents) <= experts

    table = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "status", "--app", cluster.app_name],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert table.returncode == 0, table.stdout + table.stderr
    assert all(name in table.stdout for name in experts), table.stdout
