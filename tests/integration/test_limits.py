"""Access control, backpressure and disconnects on a real Serve application.

The demo application's limits cannot be changed from a test, so this module runs one
small extra application ("limits", under /limits) on the session's Serve instance: one
tiny expert that takes one request at a time and queues at most one more, behind an
API key. It is deleted at the end of the module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from actors.weights.synthetic import build_tiny_expert
from cluster.config import parse_config
from tests.integration.conftest import RunningCluster
from tests.integration.test_tiers import demo_tokenizer_dir

pytestmark = pytest.mark.integration

APP_NAME = "limits"
PREFIX = "/limits"
KEY = "sk-limits-test-9d2f41"
EXPERT = "tiny"
# Long enough that an abandoned stream left running would hold the only slot for
# minutes: well past the wait the follow-up request is given.
LONG_TOKENS = 2000
FOLLOW_UP_TIMEOUT_S = 60.0


def chat(max_tokens: int, stream: bool = False) -> dict[str, object]:
    return {
        "model": EXPERT,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    }


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def limits_url(cluster: RunningCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from cluster.serve.app import build_app

    checkpoint = build_tiny_expert(
        tmp_path_factory.mktemp("limits") / EXPERT, 11, demo_tokenizer_dir()
    )
    config = parse_config(
        {
            "experts": [
                {
                    "name": EXPERT,
                    "checkpoint": str(checkpoint),
                    "params_b": 0.004,
                    "max_ongoing_requests": 1,
                    "max_queued_requests": 1,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                    "ray_actor_options": {"num_cpus": 0},
                }
            ],
            "categories": [{"name": "general", "examples": ["Hello"]}],
            "category_map": {"general": EXPERT},
            "generalist": EXPERT,
            "serve": {
                "app_name": APP_NAME,
                "ingress_num_cpus": 0,
                "api_key": KEY,
                "max_tokens_limit": LONG_TOKENS,
                "retry_after_s": 2,
            },
        },
        "limits test",
    )
    serve.run(build_app(config, {EXPERT: checkpoint}), name=APP_NAME, route_prefix=PREFIX)
    try:
        yield cluster.base_url + PREFIX
    finally:
        serve.delete(APP_NAME)


@pytest.mark.timeout(600)
def test_key_is_required_everywhere_but_healthz(limits_url: str) -> None:
    with httpx.Client(base_url=limits_url, timeout=120) as client:
        assert client.get("/healthz").status_code == 200
        for headers in ({}, bearer("sk-wrong"), {"Authorization": f"Basic {KEY}"}):
            refused = client.post("/v1/chat/completions", json=chat(4), headers=headers)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            assert KEY not in refused.text
        assert client.get("/openapi.json").status_code == 401
        served = client.post("/v1/chat/completions", json=chat(4), headers=bearer())
        assert served.status_code == 200, served.text
        assert served.json()["model"] == EXPERT


@pytest.mark.timeout(300)
def test_abandoned_stream_frees_the_only_slot(limits_url: str) -> None:
    with httpx.Client(base_url=limits_url, timeout=120, headers=bearer()) as client:
        request = chat(LONG_TOKENS, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert '"role":"assistant"' in first
        # Closed after the first chunk. The expert takes one request at a time, so
        # this is answered within the bound only if the abandoned one was cancelled.
        follow_up = client.post("/v1/chat/completions", json=chat(4), timeout=FOLLOW_UP_TIMEOUT_S)
        assert follow_up.status_code == 200, follow_up.text


@pytest.mark.timeout(300)
def test_burst_beyond_the_queue_is_refused_with_retry_after(limits_url: str) -> None:
    async def burst(size: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=limits_url, timeout=240, headers=bearer()) as client:
            requests = [client.post("/v1/chat/completions", json=chat(32)) for _ in range(size)]
            return list(await asyncio.gather(*requests))

    responses = asyncio.run(burst(8))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, [r.text for r in responses]
    refused = [r for r in responses if r.status_code == 429]
    assert refused, statuses  # one running + one queued; the rest must be refused
    assert statuses.count(200) >= 1
    for response in refused:
        assert response.headers["retry-after"] == "2"
        assert response.json()["error"]["code"] == "overloaded"
    # Refusals left nothing behind: the expert answers again.
    with httpx.Client(base_url=limits_url, timeout=120, headers=bearer()) as client:
        assert client.post("/v1/chat/completions", json=chat(4)).status_code == 200
