"""Schemathesis against the HTTP API's published OpenAPI schema, on a real Serve application.

Generation on the demo experts is slow on a CPU, so the fuzz runs against its own small
application beside the demo one: two tiny Llama experts, tiers off, and
`max_tokens_limit: 8` so that large `max_tokens` are refused before any generation. Every
operation gets positive (schema-conforming) and negative (schema-violating) cases, a
bounded number of each, seeded; most generated chat bodies have their `model` replaced by
a real one so the router and the experts run, not only the validation. No case may get a
5xx or break the connection, and both applications still answer a normal request after.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.core.result import Ok

from actors.weights.synthetic import build_tiny_expert
from cluster.config import CoEConfig, parse_config
from tests.integration.conftest import RunningCluster
from tests.integration.test_tiers import demo_tokenizer_dir

pytestmark = pytest.mark.integration

APP_NAME = "fuzz"
PREFIX = "/fuzz"
EXPERTS = ("alpha", "beta")
# Per operation and generation mode: a smoke run in the suite; a longer run is
# `COE_FUZZ_EXAMPLES=1000 pytest tests/integration/test_fuzz_http.py`.
EXAMPLES = int(os.environ.get("COE_FUZZ_EXAMPLES", "40"))
BUDGET_S = max(45.0, EXAMPLES * 1.0)  # for all the fuzzing; cases past it are not sent
CALL_TIMEOUT_S = 60.0
CHAT = {"model": "coe", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}


def fuzz_config(checkpoint: Path) -> CoEConfig:
    expert_options = {
        "checkpoint": str(checkpoint),
        "params_b": 0.001,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "ray_actor_options": {"num_cpus": 0},
    }
    return parse_config(
        {
            "experts": [{"name": name, **expert_options} for name in EXPERTS],
            "categories": [
                {"name": "greeting", "examples": ["Hello", "Good morning"]},
                {"name": "maths", "examples": ["What is 2 + 2?", "Solve x + 1 = 3"]},
            ],
            "category_map": {"greeting": EXPERTS[0], "maths": EXPERTS[1]},
            "generalist": EXPERTS[0],
            "router": {"num_cpus": 0},
            "tiers": {"enabled": False},
            "serve": {
                "app_name": APP_NAME,
                "ingress_num_cpus": 0,
                "max_prompt_chars": 2000,
                "max_tokens_limit": 8,
                "default_max_tokens": 4,
            },
        },
        "fuzz application",
    )


@pytest.fixture(scope="module")
def fuzz_url(cluster: RunningCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from cluster.serve.app import build_app

    root = tmp_path_factory.mktemp("fuzz")
    checkpoint = build_tiny_expert(root / "tiny", 11, demo_tokenizer_dir())
    config = fuzz_config(checkpoint)
    serve.run(
        build_app(config, {name: checkpoint for name in EXPERTS}),
        name=APP_NAME,
        route_prefix=PREFIX,
    )
    try:
        yield cluster.base_url + PREFIX
    finally:
        serve.delete(APP_NAME)


def published_schema(base_url: str) -> dict[str, Any]:
    response = httpx.get(f"{base_url}/openapi.json", timeout=30, trust_env=False)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def unresolved_refs(document: dict[str, Any]) -> list[str]:
    """Every local `$ref` in the document that points at nothing."""
    missing: list[str] = []

    def resolves(pointer: str) -> bool:
        node: Any = document
        for part in pointer.removeprefix("#/").split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/") and not resolves(ref):
                missing.append(ref)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    return sorted(set(missing))


@dataclass
class Tally:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    not_sent: int = 0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    def report(self) -> str:
        lines = [f"fuzz: {self.sent} cases sent, {self.not_sent} past the budget"]
        lines += [
            f"  {label}: {status} x{n}" for (label, status), n in sorted(self.statuses.items())
        ]
        lines += [f"  FAILURE {failure}" for failure in self.failures]
        return "\n".join(lines)


def fuzz_operation(
    operation: APIOperation, mode: GenerationMode, base_url: str, tally: Tally, deadline: float
) -> None:
    label = f"{operation.label} {mode.value}"

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=operation.as_strategy(generation_mode=mode),
        model=st.sampled_from(["coe", *EXPERTS, None]),
    )
    def send(case: Case, model: str | None) -> None:
        if time.monotonic() > deadline:
            tally.not_sent += 1
            return
        # Only positive cases get a real model: a negative one stays as generated.
        if mode.is_positive and model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        try:
            response = case.call(base_url=base_url, timeout=CALL_TIMEOUT_S)
        except Exception as error:  # a reset or a timeout is a crash as far as a client knows
            tally.failures.append(f"{label}: {type(error).__name__}: {error}")
            return
        tally.statuses[(label, response.status_code)] += 1
        if response.status_code >= 500:
            curl = case.as_curl_command(base_url=base_url)
            tally.failures.append(
                f"{label}: {response.status_code} {response.text[:300]}\n    {curl[:600]}"
            )

    with contextlib.suppress(Unsatisfiable):  # no schema-violating case without inputs
        send()


def test_published_schema_references_resolve(fuzz_url: str) -> None:
    assert unresolved_refs(published_schema(fuzz_url)) == []


@pytest.mark.timeout(600)
def test_fuzzed_requests_never_get_a_server_error(fuzz_url: str, cluster: RunningCluster) -> None:
    schema = schemathesis.openapi.from_dict(published_schema(fuzz_url))
    tally = Tally()
    deadline = time.monotonic() + BUDGET_S
    labels = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"an operation of the schema is invalid: {result.err()}"
        operation = result.ok()
        labels.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(operation, mode, fuzz_url, tally, deadline)
    print(tally.report())
    assert {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/route",
        "GET /v1/models",
        "GET /health",
    } <= set(labels)
    assert tally.failures == [], tally.report()
    assert tally.sent >= 100, tally.report()
    # Some generated requests reached the experts and were answered.
    assert tally.statuses[("POST /v1/chat/completions positive", 200)] > 0, tally.report()
    for base_url in (fuzz_url, cluster.base_url):
        response = httpx.post(
            f"{base_url}/v1/chat/completions", json=CHAT, timeout=120, trust_env=False
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] is not None
