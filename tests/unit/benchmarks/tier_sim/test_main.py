"""The tier simulator's command line, `python -m benchmarks.tier_sim`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.tier_sim.__main__ import main
from tests.conftest import PROJECT_ROOT


def test_cli_generate_replay_and_paper(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    assert main(["generate", "--out", str(trace), "--experts", "10", "--requests", "50"]) == 0
    out = tmp_path / "replay.json"
    argv = ["replay", "--trace", str(trace), "--profile", "dgx-h100", "--expert-gb", "14"]
    assert main([*argv, "--policy", "lfu", "--json", str(out)]) == 0
    replay = json.loads(out.read_text())
    assert replay["requests"] == 50 and replay["policy"] == "lfu"
    assert replay["hits"] + replay["switches"] == 50
    paper = tmp_path / "paper.json"
    assert main(["paper", "--requests", "100", "--json", str(paper)]) == 0
    assert set(json.loads(paper.read_text())["ratios"]) == {"dgx-h100", "dgx-a100"}
    assert main(["replay", "--trace", str(tmp_path / "none.csv"), "--profile", "sn40l"]) == 2
    assert "cannot read trace" in capsys.readouterr().err


def test_the_package_runs_as_a_module(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.tier_sim", "generate", "--out", str(trace)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {trace} (2000 requests)" in done.stdout
