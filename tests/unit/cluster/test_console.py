"""The progress lines `coe` commands and the benchmarks print, and where they go."""

from __future__ import annotations

import pytest

from benchmarks.startup import READY_LINE
from cluster.console import COE_PREFIX, progress, say, sayer


def test_coe_lines_go_to_stdout_with_the_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    say("ready in 1.0s")
    captured = capsys.readouterr()
    assert captured.out == "[coe] ready in 1.0s\n" and captured.err == ""
    assert captured.out.startswith(READY_LINE)  # what benchmarks/startup.py waits for


def test_benchmark_progress_goes_to_stderr_bare(capsys: pytest.CaptureFixture[str]) -> None:
    progress("warming up 3 experts")
    captured = capsys.readouterr()
    assert captured.err == "warming up 3 experts\n" and captured.out == ""


def test_a_sayer_takes_its_prefix_and_stream(capsys: pytest.CaptureFixture[str]) -> None:
    sayer("[demo] ", flush=False)("built")
    sayer(COE_PREFIX, to_stderr=True)("generated")
    captured = capsys.readouterr()
    assert captured.out == "[demo] built\n"
    assert captured.err == "[coe] generated\n"
