"""The official openai client and Python DeploymentHandle calls against the real cluster."""

from __future__ import annotations

import openai
import pytest
from ray import serve

from cluster.ingress.api_errors import InvalidRequest
from tests.integration.conftest import RunningCluster

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(cluster: RunningCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0)


def test_openai_client_non_streaming(cluster: RunningCluster) -> None:
    completion = client(cluster).chat.completions.create(model="coe", messages=QUESTION)  # type: ignore[arg-type]
    assert "Paris" in (completion.choices[0].message.content or "")
    extra = completion.model_extra or {}
    assert extra["coe"]["expert"] == "generalist"


def test_openai_client_streaming(cluster: RunningCluster) -> None:
    stream = client(cluster).chat.completions.create(
        model="coe",
        messages=QUESTION,  # type: ignore[arg-type]
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Paris" in text


def test_openai_client_sees_errors(cluster: RunningCluster) -> None:
    with pytest.raises(openai.NotFoundError):
        client(cluster).chat.completions.create(model="no-such-model", messages=QUESTION)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client(cluster).chat.completions.create(model="coe", messages=[])


def test_models_through_openai_client(cluster: RunningCluster) -> None:
    ids = {m.id for m in client(cluster).models.list()}
    assert {"coe", "generalist", "math-tutor"} <= ids


def test_deployment_handle_gives_the_http_result(cluster: RunningCluster) -> None:
    handle = serve.get_app_handle(cluster.app_name)
    body = handle.chat.remote({"model": "coe", "messages": QUESTION}).result(timeout_s=120)
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["coe"]["expert"] == "generalist"
    chunks = list(
        handle.options(stream=True).chat_stream.remote({"model": "coe", "messages": QUESTION})
    )
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "Paris" in text
    decision = handle.route.remote({"prompt": "Explain recursion in Python."}).result()
    assert decision["expert"] == "code-assistant"


def test_deployment_handle_raises_typed_errors(cluster: RunningCluster) -> None:
    handle = serve.get_app_handle(cluster.app_name)
    with pytest.raises(InvalidRequest, match="messages"):
        handle.chat.remote({"model": "coe", "messages": []}).result(timeout_s=60)


def test_each_expert_runs_on_its_engine_in_its_deployment_or_the_pool(
    cluster: RunningCluster,
) -> None:
    from cluster.serve.app import EXECUTOR_NAME, expert_deployment_name

    status = serve.status().applications[cluster.app_name]
    pooled = {e.name for e in cluster.config.executor_experts()}
    assert pooled  # the demo runs its specialists on executors
    assert status.deployments[EXECUTOR_NAME].status.value == "HEALTHY"
    executors = serve.get_deployment_handle(EXECUTOR_NAME, cluster.app_name)
    skeletons = {}
    for expert in cluster.config.experts:
        if expert.name in pooled:
            assert expert_deployment_name(expert.name) not in status.deployments
            handle = executors.options(multiplexed_model_id=expert.name)
            info = handle.describe.remote().result()
            skeletons[expert.name] = info["skeleton"]
        else:
            name = expert_deployment_name(expert.name)
            assert status.deployments[name].status.value == "HEALTHY"
            info = serve.get_deployment_handle(name, cluster.app_name).info.remote().result()
        assert info["name"] == expert.name
        expected = "DeepSpeedEngine" if expert.engine == "deepspeed" else "TransformersEngine"
        assert info["engine_class"] == expected
        assert info["parameters"] > 100_000_000
    # The transformers SmolLM2 specialists share one skeleton; DeepSpeed and Gemma do not.
    assert skeletons["code-assistant"] == skeletons["science-explainer"]
    distinct = {skeletons[name] for name in ("code-assistant", "math-tutor", "storyteller")}
    assert len(distinct) == 3


def test_concurrent_requests_for_one_expert_decode_as_a_batch(cluster: RunningCluster) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from cluster.serve.app import expert_deployment_name

    prompts = [
        "What is the capital of France?",
        "Name three primary colours.",
        "What is 7 times 6?",
        "Say hello in Spanish.",
        "What is the largest planet?",
    ]
    openai_client = client(cluster)

    def ask(prompt: str) -> str:
        completion = openai_client.chat.completions.create(
            model="generalist",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=24,
        )
        return completion.choices[0].message.content or ""

    info = serve.get_deployment_handle(expert_deployment_name("generalist"), cluster.app_name).info
    before = info.remote().result()
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    after = info.remote().result()
    alone = [ask(prompt) for prompt in prompts]
    # Those that queued behind the first request ran as one batch, and batching changed
    # no answer: each is what the expert says to that prompt on its own.
    assert after["largest_batch"] >= 2
    assert after["batched_requests"] - before["batched_requests"] == len(prompts)
    assert after["batches"] - before["batches"] < len(prompts)
    assert together == alone
