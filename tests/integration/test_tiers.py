"""The memory tiers on a real cluster: 4 experts (one pinned), an HBM budget that holds 3.

A second Serve application runs beside the demo: four small Llama experts with
distinct weights behind the placement service. The pinned one keeps a third of the
budget, so the other three share two places: the fewest experts that force evictions,
hits and re-admissions after eviction (each expert is a replica process of its own, and
their start is most of this module's time). Every answer must equal the one the same
expert gives when fully resident (loaded with from_pretrained in this process).
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

pytestmark = pytest.mark.integration

APP = "tiers"
EXPERTS = [f"tiny-{i:02d}" for i in range(4)]
PINNED = "tiny-00"
PROMPTS = ["Hello there", "What is two plus two?", "Tell me a story"]
# Revisits and a sweep wider than the budget: hits, misses, evictions, re-admissions.
# Under LRU with two unpinned places, whichever two experts the replicas' warm-ups left
# resident: at least one hit besides the pinned one, at least four evictions, at least
# three re-admissions of an evicted expert, and tiny-01 and tiny-03 resident at the end.
SEQUENCE = [1, 2, 1, 3, 2, 0, 1, 3]
# Not resident after SEQUENCE (see above): streamed through a switch.
STREAMED = 2


def tiny_config(checkpoints: dict[str, Path], budget: int, arena_dir: Path) -> CoEConfig:
    return parse_config(
        {
            "experts": [
                {
                    "name": name,
                    "checkpoint": str(checkpoints[name]),
                    "params_b": 0.006,
                    "system_prompt": f"You are expert number {index}.",
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                    "ray_actor_options": {"num_cpus": 0},
                }
                for index, name in enumerate(EXPERTS)
            ],
            "categories": [{"name": "general", "examples": ["Hello"]}],
            "category_map": {"general": EXPERTS[0]},
            "generalist": EXPERTS[0],
            "tiers": {
                "enabled": True,
                "hbm_budget_bytes": budget,
                "eviction": "lru",
                "pinned": [PINNED],
                "active_slots": 2,
                "arena_dir": str(arena_dir),
                # The arena copy (the GPU path's shape) and its restart semantics.
                "cpu_binding": "arena_copy",
            },
            "serve": {"app_name": APP},
        },
        "tiers-test",
    )


def body(expert: str, prompt: str) -> dict[str, Any]:
    return {
        "model": expert,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 6,
        "temperature": 0,
    }


@pytest.fixture(scope="module")
def tiny_checkpoints(
    demo_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    tokenizer = demo_tokenizer_dir()
    root = tmp_path_factory.mktemp("tiny-experts")
    return {
        name: build_tiny_expert(root / name, seed, tokenizer) for seed, name in enumerate(EXPERTS)
    }


def demo_tokenizer_dir() -> Path:
    """The demo SmolLM2 checkpoint's tokenizer: real, and built by the session fixture."""
    from cluster.config import load_config
    from tests.conftest import DEMO_CONFIG

    return load_config(DEMO_CONFIG).resolved_cache_dir() / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def references(tiny_checkpoints: dict[str, Path]) -> dict[tuple[str, str], str]:
    """Each expert fully resident (its own from_pretrained copy), greedy answers."""
    answers = {}
    for index, name in enumerate(EXPERTS):
        engine = TransformersEngine(name, tiny_checkpoints[name])
        server = ExpertServer(name, engine, f"You are expert number {index}.")
        for prompt in PROMPTS:
            request = GenerationRequest(
                messages=(ChatMessage(role="user", content=prompt),), max_tokens=6
            )
            answers[(name, prompt)] = server.generate(request).text
    return answers


@pytest.fixture(scope="module")
def tiered(
    cluster: RunningCluster,
    tiny_checkpoints: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    from ray import serve

    from cluster.serve.app import build_app

    size = checkpoint_nbytes(tiny_checkpoints[EXPERTS[0]], "float32")
    budget = int(size * 3.5)  # room for three experts, never four
    arena_dir = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path_factory.mktemp("arena")
    config = tiny_config(tiny_checkpoints, budget, arena_dir)
    handle = serve.run(build_app(config, tiny_checkpoints), name=APP, route_prefix=f"/{APP}")
    placement = serve.get_deployment_handle("placement", app_name=APP)
    try:
        yield {"handle": handle, "placement": placement, "budget": budget, "config": config}
    finally:
        serve.delete(APP)
        from cluster.serve.lifecycle import remove_arena

        remove_arena(config)


def residents(placement: Any) -> dict[str, dict[str, Any]]:
    device = placement.residency.remote().result()["host0"]
    return {r["expert"]: r for r in device["residents"]}


def test_every_answer_equals_the_fully_resident_expert(
    tiered: dict[str, Any], references: dict[tuple[str, str], str]
) -> None:
    handle, placement = tiered["handle"], tiered["placement"]
    before = placement.metrics.remote().result()["devices"]["host0"]
    pinned_generation = residents(placement)[PINNED]["generation"]
    for step, index in enumerate(SEQUENCE):
        expert = EXPERTS[index]
        prompt = PROMPTS[step % len(PROMPTS)]
        answer = handle.chat.remote(body(expert, prompt)).result()
        assert answer["coe"]["expert"] == expert
        assert answer["choices"][0]["message"]["content"] == references[(expert, prompt)], (
            f"step {step}: {expert} answered differently from its fully resident copy"
        )
        held = residents(placement)
        assert PINNED in held and held[PINNED]["generation"] == pinned_generation
        assert sum(r["nbytes"] for r in held.values()) <= tiered["budget"]
        assert len(held) <= 3
    after = placement.metrics.remote().result()["devices"]["host0"]
    assert after["evictions"] > before["evictions"]
    assert after["switches"] - before["switches"] >= len(set(SEQUENCE)) - 1
    assert after["hits"] > before["hits"]
    assert after["used_bytes"] <= tiered["budget"]


def test_streaming_through_the_tiers(
    tiered: dict[str, Any], references: dict[tuple[str, str], str]
) -> None:
    handle = tiered["handle"].options(stream=True)
    expert, prompt = EXPERTS[STREAMED], PROMPTS[0]
    chunks = list(handle.chat_stream.remote({**body(expert, prompt), "stream": True}))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == references[(expert, prompt)]
