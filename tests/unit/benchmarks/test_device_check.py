"""The device check's CPU-runnable parts: the copy ratio and the injection table on a
fake device, the JSON's fields and goals, and the script that runs it on a GPU."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import device_check

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "device_check.sh"
REQUIRED = (
    "device",
    "switch_over_pinned_copy",
    "injected_tokens_equal",
    "coe_ttft_p99_over_multiplex",
    "coe_goodput_over_multiplex",
)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("check") / "device_check.json"
    argv = ["--device", "cpu", "--copy-mb", "4", "--repeats", "2", "--json", str(path)]
    assert device_check.main(argv) == 0
    return path, json.loads(path.read_text())


def test_the_cpu_run_writes_every_required_field(cpu_run: tuple[Path, dict[str, Any]]) -> None:
    path, result = cpu_run
    assert all(key in result for key in REQUIRED)
    assert result["device"] == "cpu (fake device)"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert result["copy"]["bytes_equal"] and result["copy"]["bytes"] == 4_000_000
    assert result["switch_over_pinned_copy"] > 0
    # What needs a GPU is recorded as not measured, never as a made-up figure.
    assert result["injected_tokens_equal"] is None
    assert result["coe_ttft_p99_over_multiplex"] is None
    assert [goal["met"] for goal in result["goals"]] == [None, None, None, None]


def test_the_injection_table_names_each_refusal(cpu_run: tuple[Path, dict[str, Any]]) -> None:
    injection = cpu_run[1]["injection"]
    assert set(injection) == set(device_check.ARCHITECTURES)
    assert "DeepSpeed#7282" in injection["llama"]["reason"]  # the demo's SmolLM2 shape
    assert "gemma3_text" in injection["gemma3_text"]["reason"]
    assert injection["gpt2"] == {"injectable": True, "measured": False, "reason": "no GPU"}


def test_goals_are_judged_on_a_gpu_run() -> None:
    result = {
        "device_kind": "cuda",
        "switch_over_pinned_copy": 0.85,
        "injected_tokens_equal": False,
        "coe_ttft_p99_over_multiplex": 0.2,
        "coe_goodput_over_multiplex": 1.5,
    }
    assert [goal["met"] for goal in device_check.goals(result)] == [True, False, True, False]


def test_asking_for_cuda_without_it_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        device_check.parse_args(["--device", "cuda", "--json", str(tmp_path / "x.json")])
    assert "torch sees no GPU" in capsys.readouterr().err


def test_the_script_runs_the_cuda_tests_then_the_check() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert text.index("tests/gpu") < text.index("-m benchmarks.device_check --device cuda")
    assert SCRIPT.stat().st_mode & stat.S_IXUSR
