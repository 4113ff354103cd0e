"""Adding an expert and a category to a running cluster: a config change, no restarts.

A small application runs beside the demo. Its second version adds an expert and a
category (learned from its examples); Serve reconfigures the router in place and
leaves every existing replica running.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.weights.synthetic import build_tiny_expert
from cluster.config import CoEConfig, parse_config
from tests.integration.conftest import RunningCluster

pytestmark = pytest.mark.integration

APP = "live"
POEM = "Write a short poem about the autumn rain."


def live_config(checkpoints: dict[str, Path], with_poet: bool) -> CoEConfig:
    experts = ["helper", "counter"] + (["poet"] if with_poet else [])
    categories = [
        {"name": "general", "examples": ["What is the capital of France?", "Who wrote Hamlet?"]},
        {"name": "math", "examples": ["What is 17 times 23?", "Solve 2x + 5 = 13."]},
    ]
    category_map = {"general": "helper", "math": "counter"}
    if with_poet:
        categories.append(
            {
                "name": "poetry",
                "examples": ["Write a poem about the sea.", "Compose a haiku about snow."],
            }
        )
        category_map["poetry"] = "poet"
    return parse_config(
        {
            "experts": [
                {
                    "name": name,
                    "checkpoint": str(checkpoints[name]),
                    "params_b": 0.006,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                    "ray_actor_options": {"num_cpus": 0},
                }
                for name in experts
            ],
            "categories": categories,
            "category_map": category_map,
            "generalist": "helper",
            "router": {"confidence_threshold": 0.0, "num_cpus": 0},
            "serve": {"app_name": APP, "ingress_num_cpus": 0},
        },
        "live-test",
    )


@pytest.fixture(scope="module")
def checkpoints(
    demo_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("live-experts")
    tokenizer = demo_checkpoints["generalist"]
    return {
        name: build_tiny_expert(root / name, seed, tokenizer)
        for seed, name in enumerate(["helper", "counter", "poet"], start=100)
    }


@pytest.fixture(scope="module")
def live(cluster: RunningCluster, checkpoints: dict[str, Path]) -> Iterator[Any]:
    from ray import serve

    from cluster.serve.app import build_app

    serve.run(
        build_app(live_config(checkpoints, False), checkpoints), name=APP, route_prefix=f"/{APP}"
    )
    try:
        yield serve
    finally:
        serve.delete(APP)


def pids(serve: Any) -> dict[str, int]:
    found = {"router": serve.get_deployment_handle("router", APP).info.remote().result()["pid"]}
    for name in ("helper", "counter"):
        handle = serve.get_deployment_handle(f"expert-{name}", APP)
        found[name] = handle.info.remote().result()["pid"]
    return found


def test_adding_an_expert_and_a_category_takes_effect_without_restarts(
    live: Any, checkpoints: dict[str, Path]
) -> None:
    from cluster.serve.app import build_app

    serve = live
    ingress = serve.get_app_handle(APP)
    before = ingress.route.remote({"messages": [{"role": "user", "content": POEM}]}).result()
    assert before["category"] in {"general", "math"}
    running = pids(serve)
    router_info = serve.get_deployment_handle("router", APP).info.remote().result()

    serve.run(
        build_app(live_config(checkpoints, True), checkpoints), name=APP, route_prefix=f"/{APP}"
    )

    ingress = serve.get_app_handle(APP)
    after = ingress.route.remote({"messages": [{"role": "user", "content": POEM}]}).result()
    assert (after["category"], after["expert"]) == ("poetry", "poet")
    answer = ingress.chat.remote(
        {"model": "coe", "messages": [{"role": "user", "content": POEM}], "max_tokens": 4}
    ).result()
    assert answer["coe"]["expert"] == "poet"
    assert pids(serve) == running  # the router and the existing experts kept running
    reconfigured = serve.get_deployment_handle("router", APP).info.remote().result()
    assert reconfigured["reconfigurations"] == router_info["reconfigurations"] + 1
    assert "poetry" in reconfigured["categories"]
