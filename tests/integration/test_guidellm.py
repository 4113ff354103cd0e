"""guidellm (the vLLM project's serving benchmark) against the real cluster, offline.

guidellm checks `GET /health`, then sends streamed chat completions with vLLM's
`ignore_eos` and `stream_options.continuous_usage_stats`; every request must succeed,
each answer exactly the output length it asked for (ignore_eos is honoured), with the
prompt length it asked for (counted by the demo checkpoint's tokenizer) and timings in
order. A few requests, one at a time, on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import RunningCluster
from tests.integration.test_tiers import demo_tokenizer_dir

pytestmark = pytest.mark.integration
REQUESTS = 4
PROMPT_TOKENS = 32
OUTPUT_TOKENS = 8


def guidellm_run(
    base_url: str, out: Path, data: str, request_format: str = "/v1/chat/completions"
) -> subprocess.CompletedProcess[str]:
    command = [
        str(Path(sys.executable).with_name("guidellm")),
        "run",
        "--backend",
        f"kind=openai_http,target={base_url},model=coe,request_format={request_format}",
        "--profile",
        "kind=synchronous",
        "--constraint",
        f"kind=max_requests,count={REQUESTS}",
        "--tokenizer",
        f"kind=hf_auto,model={demo_tokenizer_dir()}",
        "--data",
        data,
        "--seed",
        "kind=static,value=0",
        "--output",
        f"kind=json,path={out}",
        "--disable-console-interactive",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    return subprocess.run(
        command, capture_output=True, text=True, timeout=480, env=env, check=False, cwd=out.parent
    )


def requests_by_status(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    (benchmark,) = report["benchmarks"]
    return {status: list(found or []) for status, found in benchmark["requests"].items()}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("request_format", ["/v1/chat/completions", "/v1/completions"])
def test_guidellm_benchmark_succeeds_with_sensible_counts_and_timings(
    cluster: RunningCluster, tmp_path: Path, request_format: str
) -> None:
    out = tmp_path / "benchmarks.json"
    data = f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}"
    run = guidellm_run(cluster.base_url, out, data, request_format)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    found = requests_by_status(json.loads(out.read_text()))
    successful = found.pop("successful")
    assert len(successful) == REQUESTS, {k: len(v) for k, v in found.items()}
    assert all(not requests for requests in found.values()), found
    for request in successful:
        assert request["output_tokens"] == OUTPUT_TOKENS
        # The server counts the prompt in its expert's tokenizer (SmolLM2's or Gemma's),
        # after the chat template for a chat: near the length asked for, or above it.
        assert request["prompt_tokens"] >= PROMPT_TOKENS // 2
        ttft_s = request["time_to_first_token_ms"] / 1000
        assert 0 < ttft_s <= request["request_latency"]
        assert request["output"]
