"""`coe apply` never changes who may call the cluster by accident, and keeps the ingress.

A keyed application runs beside the demo. `coe apply` takes the key from the applying
shell's environment: without it (or with another key) the apply is refused and
nothing changes, unless `--change-api-key` says the change is meant. An apply that
changes nothing the ingress depends on leaves its replica (and its streams) running.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from actors.weights.synthetic import build_tiny_expert
from cluster.config import CoEConfig, parse_config
from cluster.ingress.auth import key_fingerprint
from tests.conftest import PROJECT_ROOT
from tests.integration.conftest import RunningCluster

pytestmark = pytest.mark.integration

APP = "keyed"
KEY_ENV = "COE_APPLY_TEST_KEY"
KEY = "first-secret-key"


def keyed_data(checkpoint: Path) -> dict[str, Any]:
    return {
        "experts": [
            {
                "name": "helper",
                "checkpoint": str(checkpoint),
                "params_b": 0.006,
                "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                "ray_actor_options": {"num_cpus": 0},
            }
        ],
        "categories": [{"name": "general", "examples": ["What is the capital of France?"]}],
        "category_map": {"general": "helper"},
        "generalist": "helper",
        "router": {"num_cpus": 0},
        "serve": {
            "app_name": APP,
            "route_prefix": f"/{APP}",
            "ingress_num_cpus": 0,
            "api_key_env": KEY_ENV,
        },
        "tiers": {"enabled": False},
    }


@pytest.fixture(scope="module")
def config_file(
    demo_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("keyed")
    checkpoint = build_tiny_expert(root / "helper", 7, demo_checkpoints["generalist"])
    path = root / "keyed.yaml"
    path.write_text(yaml.safe_dump(keyed_data(checkpoint)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def keyed(cluster: RunningCluster, config_file: Path) -> Iterator[CoEConfig]:
    from cluster.serve import lifecycle
    from cluster.setup_steps import prepare_checkpoints

    os.environ[KEY_ENV] = KEY
    try:
        config = parse_config(yaml.safe_load(config_file.read_text()), "keyed")
        lifecycle.deploy(config, prepare_checkpoints(config, progress=print))
        yield config
    finally:
        os.environ.pop(KEY_ENV, None)
        lifecycle.undeploy(APP)


def apply(config_file: Path, key: str | None, *flags: str) -> tuple[int, str]:
    env = {name: value for name, value in os.environ.items() if name != KEY_ENV}
    if key is not None:
        env[KEY_ENV] = key
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "apply", str(config_file), *flags],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def ingress_state() -> tuple[str, str | None]:
    """(the ingress replica's id, its key's fingerprint)."""
    from ray import serve

    from cluster.serve.ray_internals import serve_details

    replicas = serve_details()["applications"][APP]["deployments"]["ingress"]["replicas"]
    running = [r["replica_id"] for r in replicas if r["state"] == "RUNNING"]
    handle = serve.get_deployment_handle("ingress", app_name=APP)
    return running[0], handle.api_key_fingerprint.remote().result(timeout_s=60)


def test_apply_refuses_an_unmeant_key_change_and_keeps_the_ingress(
    keyed: CoEConfig, config_file: Path
) -> None:
    replica, fingerprint = ingress_state()
    assert fingerprint == key_fingerprint(KEY)

    # Both refusals apply nothing, so they run at once (each is a process start).
    with ThreadPoolExecutor(max_workers=2) as pool:
        lacking = pool.submit(apply, config_file, None)  # a shell without the key
        other = pool.submit(apply, config_file, "another-key")
    code, output = lacking.result()
    assert code == 2, output
    assert "turns authentication OFF" in output and "--change-api-key" in output
    code, output = other.result()
    assert code == 2, output
    assert "CHANGES the API key" in output
    assert ingress_state() == (replica, fingerprint)  # nothing was applied

    code, output = apply(config_file, KEY)  # the same config and key: nothing to restart
    assert code == 0, output
    assert ingress_state() == (replica, fingerprint)

    code, output = apply(config_file, "another-key", "--change-api-key")
    assert code == 0, output
    assert "CHANGES the API key" in output
    new_replica, new_fingerprint = ingress_state()
    assert new_fingerprint == key_fingerprint("another-key") and new_replica != replica
