"""Twelve experts served through two executors: every answer equals the expert's own
fully resident answer, and the process count does not grow with the experts.

Twelve is three times what the arena holds and more than the two executors keep ready
together, so switches and evicted expert contexts happen as they would with hundreds;
each expert more is only another checkpoint to build, pack and answer from.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.engines.base import ChatMessage, GenerationRequest
from actors.engines.transformers_engine import TransformersEngine
from actors.expert_server import ExpertServer
from actors.weights.synthetic import build_tiny_expert
from cluster.config import CoEConfig, parse_config
from memory_tiers.packing import checkpoint_nbytes
from tests.integration.conftest import RunningCluster
from tests.integration.test_tiers import body, demo_tokenizer_dir

pytestmark = pytest.mark.integration

APP = "executors-test"
EXPERTS = [f"pooled-{i:02d}" for i in range(12)]
DEDICATED = "pooled-00"  # one expert keeps a deployment of its own beside the pool
PROMPTS = ["Hello there", "What is two plus two?"]
ROUNDS = 2


def system_prompt(index: int) -> str:
    return f"You are expert number {index}. Answer briefly."


def executor_config(checkpoints: dict[str, Path], budget: int, arena_dir: Path) -> CoEConfig:
    return parse_config(
        {
            "experts": [
                {
                    "name": name,
                    "checkpoint": str(checkpoints[name]),
                    "params_b": 0.006,
                    "system_prompt": system_prompt(index),
                    **(
                        {"dedicated": True, "ray_actor_options": {"num_cpus": 0}}
                        if name == DEDICATED
                        else {}
                    ),
                }
                for index, name in enumerate(EXPERTS)
            ],
            "categories": [{"name": "general", "examples": ["Hello"]}],
            "category_map": {"general": EXPERTS[1]},
            "generalist": EXPERTS[1],
            "tiers": {
                "enabled": True,
                "hbm_budget_bytes": budget,
                "active_slots": 2,
                "arena_dir": str(arena_dir),
            },
            "executors": {
                "enabled": True,
                "replicas": 2,
                # Two executors keep eight ready, fewer than the eleven pooled experts:
                # contexts are evicted and rebuilt.
                "max_experts_per_replica": 4,
                "num_cpus": 0,
            },
            "serve": {"app_name": APP},
        },
        "executors-test",
    )


@pytest.fixture(scope="module")
def checkpoints(
    demo_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    tokenizer = demo_tokenizer_dir()
    root = tmp_path_factory.mktemp("pooled-experts")
    return {
        name: build_tiny_expert(root / name, seed, tokenizer) for seed, name in enumerate(EXPERTS)
    }


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[tuple[str, str], str]:
    answers = {}
    for index, name in enumerate(EXPERTS):
        engine = TransformersEngine(name, checkpoints[name])
        server = ExpertServer(name, engine, system_prompt(index))
        for prompt in PROMPTS:
            request = GenerationRequest(
                messages=(ChatMessage(role="user", content=prompt),), max_tokens=6
            )
            answers[(name, prompt)] = server.generate(request).text
        server.close()
    return answers


@pytest.fixture(scope="module")
def pooled(
    cluster: RunningCluster,
    checkpoints: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    from ray import serve

    from cluster.serve.app import build_app

    size = checkpoint_nbytes(checkpoints[EXPERTS[0]], "float32")
    budget = int(size * 4.5)  # four of twelve experts resident at a time
    arena_dir = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path_factory.mktemp("arena")
    config = executor_config(checkpoints, budget, arena_dir)
    handle = serve.run(build_app(config, checkpoints), name=APP, route_prefix=f"/{APP}")
    try:
        yield {"handle": handle, "config": config}
    finally:
        serve.delete(APP)
        from cluster.serve.lifecycle import remove_arena

        remove_arena(config)


def test_twelve_experts_through_two_executors_answer_as_if_alone(
    pooled: dict[str, Any], references: dict[tuple[str, str], str]
) -> None:
    from ray import serve

    handle = pooled["handle"]
    # Requests in flight together, in an order that revisits experts after the arena
    # and the executors' expert caches have moved on.
    order = [(name, PROMPTS[(i + r) % 2]) for r in range(ROUNDS) for i, name in enumerate(EXPERTS)]
    for start in range(0, len(order), 6):
        wave = order[start : start + 6]
        responses = [handle.chat.remote(body(name, prompt)) for name, prompt in wave]
        for (name, prompt), response in zip(wave, responses, strict=True):
            answer = response.result(timeout_s=120)
            assert answer["coe"]["expert"] == name
            assert answer["choices"][0]["message"]["content"] == references[(name, prompt)], (
                f"{name} answered {prompt!r} differently from its fully resident copy"
            )

    deployments = serve.status().applications[APP].deployments
    assert sorted(deployments) == sorted(
        ["ingress", "router", "placement", "executors", f"expert-{DEDICATED}"]
    )
    executors = serve.get_deployment_handle("executors", app_name=APP)
    infos = {}
    for _ in range(40):  # requests reach replicas at random: ask until both answered
        info = executors.info.remote().result()
        infos[info["pid"]] = info
        if len(infos) == 2:
            break
    assert len(infos) == 2
    served = sum(sum(info["requests"].values()) for info in infos.values())
    assert served == (len(EXPERTS) - 1) * ROUNDS  # all but the dedicated expert
    assert all(info["skeletons"] == 1 for info in infos.values())  # one architecture
    # What the executors' request router ranks them by: their device and its residents.
    stats = executors.record_routing_stats.remote().result()
    assert stats["device"] == "host0" and set(stats["resident"]) <= set(EXPERTS)
    placement = serve.get_deployment_handle("placement", app_name=APP)
    # A CPU device binds experts in the object store by default: no arena file at all.
    assert placement.describe.remote(EXPERTS[1]).result()["arena_path"] is None
    metrics = placement.metrics.remote().result()["devices"]["host0"]
    assert metrics["switches"] >= len(EXPERTS)  # far more experts than the arena holds
    assert metrics["used_bytes"] <= pooled["config"].tiers.hbm_budget_bytes


def test_a_stream_through_an_executor(
    pooled: dict[str, Any], references: dict[tuple[str, str], str]
) -> None:
    handle = pooled["handle"].options(stream=True)
    expert, prompt = EXPERTS[11], PROMPTS[1]
    chunks = list(handle.chat_stream.remote({**body(expert, prompt), "stream": True}))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == references[(expert, prompt)]


def test_models_lists_pooled_experts_by_name(pooled: dict[str, Any]) -> None:
    listed = {m["id"] for m in pooled["handle"].models.remote().result()["data"]}
    assert set(EXPERTS) <= listed


def executor_pids(app: str) -> set[int]:
    from ray import serve

    executors = serve.get_deployment_handle("executors", app_name=app)
    pids: set[int] = set()
    for _ in range(60):  # requests reach replicas at random: ask until both answered
        pids.add(executors.info.remote().result()["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2
    return pids


def test_a_changed_and_an_added_expert_apply_without_restarting_executors(
    pooled: dict[str, Any], checkpoints: dict[str, Path]
) -> None:
    """Runs last: it changes the application the other tests share."""
    from ray import serve

    from cluster.serve.app import build_app

    config: CoEConfig = pooled["config"]
    before = executor_pids(APP)
    data = config.model_dump(mode="json", exclude_unset=True)
    changed, added = EXPERTS[5], "pooled-extra"
    data["experts"][5]["system_prompt"] = "Reply in one word."
    data["experts"].append(
        {
            "name": added,
            "checkpoint": str(checkpoints[EXPERTS[3]]),
            "params_b": 0.006,
            "system_prompt": "You are the newest expert.",
        }
    )
    new_config = parse_config(data)
    new_checkpoints = {**checkpoints, added: checkpoints[EXPERTS[3]]}
    handle = serve.run(build_app(new_config, new_checkpoints), name=APP, route_prefix=f"/{APP}")
    for name in (changed, added):
        expert = new_config.expert(name)
        engine = TransformersEngine(name, new_checkpoints[name])
        reference = ExpertServer(name, engine, expert.system_prompt).generate(
            GenerationRequest(
                messages=(ChatMessage(role="user", content=PROMPTS[0]),), max_tokens=6
            )
        )
        answer = handle.chat.remote(body(name, PROMPTS[0])).result(timeout_s=120)
        assert answer["choices"][0]["message"]["content"] == reference.text, name
    assert executor_pids(APP) == before  # reconfigured in place, not restarted


def answer_of(name: str, checkpoint: Path, system_prompt: str) -> str:
    server = ExpertServer(name, TransformersEngine(name, checkpoint), system_prompt)
    request = GenerationRequest(
        messages=(ChatMessage(role="user", content=PROMPTS[0]),), max_tokens=6
    )
    text = server.generate(request).text
    server.close()
    return text


def test_a_changed_checkpoint_is_repacked_and_a_removed_expert_unregistered(
    pooled: dict[str, Any],
    checkpoints: dict[str, Path],
    references: dict[tuple[str, str], str],
) -> None:
    """Runs after the apply above: a pooled and the dedicated expert get other weights
    (same architecture, so nothing but the placement service's repacking could tell),
    and one expert leaves the config."""
    from ray import serve

    from cluster.serve.app import build_app

    config: CoEConfig = pooled["config"]
    pooled_one, removed = EXPERTS[6], EXPERTS[9]
    moved = {pooled_one: checkpoints[EXPERTS[7]], DEDICATED: checkpoints[EXPERTS[8]]}
    expected = {
        name: answer_of(name, path, system_prompt(EXPERTS.index(name)))
        for name, path in moved.items()
    }
    for name in moved:  # otherwise the old bytes would pass for the new ones
        assert expected[name] != references[(name, PROMPTS[0])], name
    handle = pooled["handle"]
    for name in moved:  # resident (and bound) with the old weights before the apply
        handle.chat.remote(body(name, PROMPTS[0])).result(timeout_s=120)

    data = config.model_dump(mode="json", exclude_unset=True)
    data["experts"] = [e for e in data["experts"] if e["name"] != removed]
    for expert in data["experts"]:
        if expert["name"] in moved:
            expert["checkpoint"] = str(moved[expert["name"]])
    new_checkpoints = {n: p for n, p in {**checkpoints, **moved}.items() if n != removed}
    handle = serve.run(
        build_app(parse_config(data), new_checkpoints), name=APP, route_prefix=f"/{APP}"
    )
    for name in moved:
        answer = handle.chat.remote(body(name, PROMPTS[0])).result(timeout_s=120)
        assert answer["choices"][0]["message"]["content"] == expected[name], (
            f"{name} still answers with its old weights"
        )
    placement = serve.get_deployment_handle("placement", app_name=APP)
    with pytest.raises(Exception, match="unknown expert"):
        placement.describe.remote(removed).result(timeout_s=60)
    residents = placement.residency.remote().result(timeout_s=60)["host0"]["residents"]
    assert removed not in {r["expert"] for r in residents}
