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
