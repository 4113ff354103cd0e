"""`coe status`: the table from a gathered dict, the JSON output, and the no-cluster errors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from cluster.cli import status_command
from cluster.cli.main import main
from cluster.cli.status_command import expert_rows, format_status_table
from cluster.serve.metrics import ServeRequestMetrics
from memory_tiers.ddr import CallableSource, InProcessObjectStore
from memory_tiers.packing import TensorEntry, TensorIndex
from memory_tiers.placement import DeviceSpec, PlacementService
from router.decision import RouteDecision

MIB = 2**20


def packed(nbytes: int) -> tuple[np.ndarray, TensorIndex]:
    index = TensorIndex((TensorEntry("w", "uint8", (nbytes,), 0, nbytes),), nbytes)
    return np.zeros(nbytes, dtype=np.uint8), index


def deployment(status: str, running: int, target: int, message: str = "") -> dict[str, Any]:
    return {"status": status, "running": running, "target": target, "message": message}


def gathered_cluster() -> dict[str, Any]:
    """What gather_status returns, built from the real placement service and observer."""
    service = PlacementService([DeviceSpec("host0", 3 * MIB)], InProcessObjectStore(), "lru")
    for name in ("generalist", "coder", "poet"):
        service.register(name, CallableSource(lambda: packed(MIB), name))
    service.pin("generalist", "host0")
    service.release(service.acquire("coder", "host0"))
    observer = ServeRequestMetrics(NullMetrics())  # only the in-process counts matter
    observer.routed(RouteDecision("coder", "code", 0.8, False, {}))
    observer.started("coder")
    observer.started("coder")
    observer.finished("coder", "code", 200, 0.3)
    observer.started("poet")
    observer.finished("poet", "poetry", 500, 0.3)
    observer.finished(None, None, 400, 0.0)
    return json.loads(
        json.dumps(
            {
                "app": "coe",
                "app_status": "RUNNING",
                "deployments": {
                    "expert-generalist": deployment("HEALTHY", 1, 1),
                    "expert-coder": deployment("UPSCALING", 1, 2, "scaling up"),
                    "expert-poet": deployment("HEALTHY", 1, 1),
                    "ingress": deployment("HEALTHY", 1, 1),
                    "placement": deployment("HEALTHY", 1, 1),
                    "router": deployment("HEALTHY", 1, 1),
                },
                "router": {"mode": "soft", "categories": ["code", "poetry"]},
                "stats": observer.snapshot(),
                "residency": service.residency_json(),
                "tier_metrics": service.metrics(),
                "problems": [],
            }
        )
    )


class _Sink:
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...

    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class NullMetrics:
    """The constructors of `ray.serve.metrics`, making metrics that record nothing."""

    def Counter(self, name: str, description: str = "", tag_keys: Any = None) -> _Sink:
        return _Sink()

    def Gauge(self, name: str, description: str = "", tag_keys: Any = None) -> _Sink:
        return _Sink()

    def Histogram(
        self, name: str, description: str = "", boundaries: Any = None, tag_keys: Any = None
    ) -> _Sink:
        return _Sink()


def test_rows_join_replicas_residency_and_the_ingress_counts() -> None:
    rows = {row["expert"]: row for row in expert_rows(gathered_cluster())}
    assert list(rows) == ["coder", "generalist", "poet"]
    assert rows["coder"]["replicas"] == "1/2"
    assert rows["coder"]["queue"] == 1 and rows["coder"]["requests"] == 1
    assert rows["poet"]["errors"] == 1 and rows["poet"]["queue"] == 0
    assert rows["generalist"]["resident"]["pinned"] is True
    assert rows["poet"]["resident"] is None


def test_table_shows_every_expert_with_replicas_residency_queue_and_errors() -> None:
    text = format_status_table(gathered_cluster())
    lines = text.splitlines()
    assert lines[0] == "application 'coe': RUNNING; router mode soft"
    header = lines[1].split()
    assert header == ["expert", "status", "replicas", "resident", "queue", "requests", "errors"]
    by_expert = {line.split()[0]: line for line in lines[2:5]}
    assert by_expert["coder"].split()[:3] == ["coder", "UPSCALING", "1/2"]
    assert by_expert["coder"].split()[-3:] == ["1", "1", "0"]
    assert "host0 1 MiB pinned" in by_expert["generalist"]
    assert by_expert["poet"].split()[3] == "-"  # not resident
    assert by_expert["poet"].split()[-3:] == ["0", "1", "1"]
    assert "other deployments: ingress HEALTHY 1/1, placement HEALTHY 1/1" in text
    assert "host0: 2 resident" in text and "switches 2" in text
    assert "ingress: 3 requests, 0 fallbacks, 1 rejected before routing; routed code 1" in text
    assert "note: scaling up" in text


def test_pooled_experts_are_rows_served_by_the_executor_pool() -> None:
    gathered = gathered_cluster()
    del gathered["deployments"]["expert-poet"]
    gathered["deployments"]["executors"] = deployment("HEALTHY", 2, 2)
    gathered["executors"] = {"experts": ["poet", "critic"], "pid": 1}
    rows = {row["expert"]: row for row in expert_rows(gathered)}
    assert list(rows) == ["coder", "critic", "generalist", "poet"]
    assert rows["poet"]["replicas"] == "pool 2/2" and rows["poet"]["errors"] == 1
    assert rows["critic"]["replicas"] == "pool 2/2" and rows["critic"]["requests"] == 0
    assert rows["coder"]["replicas"] == "1/2"
    text = format_status_table(gathered)
    assert "executors HEALTHY 2/2" in text  # the pool itself is listed with the others


def test_table_says_what_it_could_not_learn() -> None:
    gathered = gathered_cluster()
    gathered.update(
        stats=None,
        residency=None,
        tier_metrics=None,
        problems=["ingress.stats() failed: RayServeException: no such method"],
    )
    text = format_status_table(gathered)
    coder = next(line for line in text.splitlines() if line.startswith("coder"))
    assert coder.split()[-3:] == ["?", "?", "?"]
    assert "tiers: off" in text
    assert "unavailable: ingress.stats() failed" in text


def test_json_output_is_the_gathered_dict(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gathered = gathered_cluster()
    calls: list[tuple[str, str]] = []

    def fake_gather(address: str, app: str) -> dict[str, Any]:
        calls.append((address, app))
        return gathered

    monkeypatch.setattr(status_command, "gather_status", fake_gather)
    assert main(["status", "--json", "--app", "other", "--address", "10.0.0.1:6379"]) == 0
    assert calls == [("10.0.0.1:6379", "other")]
    assert json.loads(capsys.readouterr().out) == gathered


def test_no_running_cluster_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    def no_cluster(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", no_cluster)
    assert main(["status"]) == 2
    out = capsys.readouterr().out
    assert "error: no running cluster at 'auto'" in out
    assert "coe serve" in out


def test_a_refused_token_names_ray_token_authentication(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    def refused(*args: object, **kwargs: object) -> None:
        raise AuthenticationError("Token authentication failed")

    monkeypatch.setattr(ray, "init", refused)
    assert main(["status"]) == 2
    out = capsys.readouterr().out
    assert "token authentication" in out and "RAY_AUTH_TOKEN" in out
    assert "Token authentication failed" in out
