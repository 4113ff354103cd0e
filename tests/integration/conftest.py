"""One real Ray Serve instance per session, running the demo config on real weights."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.config import CoEConfig, load_config
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

    return prepare_checkpoints(demo_config, progress=lambda line: print(f"[demo] {line}"))


@pytest.fixture(scope="session")
def cluster(demo_config: CoEConfig, demo_checkpoints: dict[str, Path]) -> Iterator[RunningCluster]:
    import ray
    from ray import serve

    from cluster.cli.serve_command import remove_arena
    from cluster.serve.app import build_app
    from cluster.serve.grpc_proxy import serve_start_options

    port = free_port()
    grpc_port = free_port()
    grpc_settings = demo_config.serve.model_copy(update={"grpc_port": grpc_port})
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            **serve_start_options(grpc_settings),
        )
        app_name = demo_config.serve.app_name
        serve.run(build_app(demo_config, demo_checkpoints), name=app_name, route_prefix="/")
        yield RunningCluster(
            demo_config, f"http://127.0.0.1:{port}", app_name, demo_checkpoints, grpc_port
        )
    finally:
        serve.shutdown()
        ray.shutdown()
        remove_arena(demo_config)
