"""One real Ray Serve instance per session, running the demo config on real weights."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.config import CoEConfig, load_config
from cluster.console import sayer
from tests.conftest import DEMO_CONFIG, free_port


@dataclass(frozen=True)
class RunningCluster:
    config: CoEConfig
    base_url: str
    app_name: str
    checkpoints: dict[str, Path]
    grpc_port: int | None = None  # Serve's gRPC proxy, bound like HTTP (loopback)


INTEGRATION_DIR = Path(__file__).resolve().parent
# How often a stopping replica looks for requests it still holds. Serve's default (2 s)
# is slept once even by an idle replica, so every application a test deletes and every
# benchmark system the harness stops took two seconds more than its drain. A replica
# still waits for each request it holds (up to graceful_shutdown_timeout_s) as before.
DRAIN_POLL_S = 0.2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """This suite's modules that need no session cluster (the engines, the scale
    benchmark in a Ray instance of its own) run first, before the cluster starts: its
    replicas, idle, still take about a tenth of two cores. Modules stay whole."""
    slots = [i for i, item in enumerate(items) if INTEGRATION_DIR in item.path.parents]
    needs_cluster = {
        items[i].path for i in slots if "cluster" in getattr(items[i], "fixturenames", ())
    }
    ordered = sorted((items[i] for i in slots), key=lambda item: item.path in needs_cluster)
    for slot, item in zip(slots, ordered, strict=True):
        items[slot] = item


@pytest.fixture(scope="session", autouse=True)
def prompt_replica_stops() -> Iterator[None]:
    """Every deployment the applications of this session bind (the demo's, the test
    applications', the benchmark systems') polls its drain every DRAIN_POLL_S."""
    from ray.serve import Deployment

    from cluster.serve import app

    with pytest.MonkeyPatch.context() as patch:
        for name, value in list(vars(app).items()):
            if isinstance(value, Deployment):
                patch.setattr(app, name, value.options(graceful_shutdown_wait_loop_s=DRAIN_POLL_S))
        yield


@pytest.fixture(scope="session")
def demo_config() -> CoEConfig:
    return load_config(DEMO_CONFIG)


@pytest.fixture(scope="session")
def demo_checkpoints(demo_config: CoEConfig) -> dict[str, Path]:
    from cluster.setup_steps import prepare_checkpoints

    return prepare_checkpoints(demo_config, progress=sayer("[demo] ", flush=False))


@pytest.fixture(scope="session")
def cluster(demo_config: CoEConfig, demo_checkpoints: dict[str, Path]) -> Iterator[RunningCluster]:
    from cluster.serve import lifecycle

    port = free_port()
    grpc_port = free_port()
    # HTTP and gRPC on loopback, on ports free now; the rest as the demo config says.
    settings = demo_config.serve.model_copy(
        update={"host": "127.0.0.1", "port": port, "grpc_port": grpc_port}
    )
    # Serve's driver-side INFO lines are left on here; `coe serve` and the benchmarks quiet them.
    with lifecycle.local_serve(settings, quiet_serve_logs=False, config=demo_config) as base_url:
        lifecycle.deploy(demo_config, demo_checkpoints)
        app_name = demo_config.serve.app_name
        yield RunningCluster(demo_config, base_url, app_name, demo_checkpoints, grpc_port)
