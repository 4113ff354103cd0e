"""The routes and fields other OpenAI-compatible servers offer, through real clients: the
official `openai` client on /v1/completions and vLLM's extra fields, curl streaming a text
completion, and GET /health."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import openai
import pytest

from tests.integration.conftest import RunningCluster

pytestmark = pytest.mark.integration
PROMPT = "The capital of France is"


def client(cluster: RunningCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0)


def test_health_is_served_beside_healthz(cluster: RunningCluster) -> None:
    for path in ("/health", "/healthz"):
        response = httpx.get(f"{cluster.base_url}{path}", timeout=30)
        assert response.status_code == 200, response.text


def test_openai_client_text_completion(cluster: RunningCluster) -> None:
    completion = client(cluster).completions.create(model="generalist", prompt=PROMPT, max_tokens=8)
    assert completion.object == "text_completion"
    choice = completion.choices[0]
    assert choice.text.strip()
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 8
    assert completion.usage.prompt_tokens > 0
    assert (completion.model_extra or {})["coe"]["expert"] == "generalist"


def test_openai_client_routed_text_completion_streams_with_usage(cluster: RunningCluster) -> None:
    stream = client(cluster).completions.create(
        model="coe",
        prompt="def fibonacci(n):",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 12
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] in ("stop", "length")
    assert (chunks[0].model_extra or {})["coe"]["routed"] is True


def test_openai_client_sends_vllm_fields_through_extra_body(cluster: RunningCluster) -> None:
    """ignore_eos is honoured: the answer runs to max_tokens; continuous usage counts up."""
    stream = client(cluster).chat.completions.create(
        model="generalist",
        messages=[{"role": "user", "content": "Say yes."}],
        max_tokens=10,
        temperature=0.8,
        stream=True,
        # vLLM's continuous usage is not in the client's types; extra_body sends it.
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    )
    chunks = list(stream)
    counts = [c.usage.completion_tokens for c in chunks if c.usage is not None]
    assert len(counts) == len(chunks)  # usage on every chunk
    assert counts == sorted(counts)
    assert counts[-1] == 10
    completion = client(cluster).completions.create(
        model="generalist",
        prompt=PROMPT,
        max_tokens=6,
        extra_body={"min_tokens": 6, "repetition_penalty": 1.3},
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 6


def test_openai_client_sees_refusals_in_openai_shape(cluster: RunningCluster) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client(cluster).completions.create(model="coe", prompt=PROMPT, n=2)
    assert refused.value.code == "unsupported_value"
    assert refused.value.param == "n"
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client(cluster).chat.completions.create(
            model="coe", messages=[{"role": "user", "content": "Hi"}], logprobs=True
        )
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        client(cluster).completions.create(
            model="coe", prompt=PROMPT, extra_body={"guided_regex": "a+"}
        )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_a_text_completion(cluster: RunningCluster) -> None:
    body = {
        "model": "generalist",
        "prompt": PROMPT,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    run = subprocess.run(
        [
            "curl",
            "-sSN",
            "--fail-with-body",
            f"{cluster.base_url}/v1/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    payloads = [
        line[len("data: ") :] for line in run.stdout.splitlines() if line.startswith("data: ")
    ]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]).strip()
    assert chunks[-1]["choices"] == [] and 0 < chunks[-1]["usage"]["completion_tokens"] <= 8
