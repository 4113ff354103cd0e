"""`coe demo build`'s faults reach the operator as one `error: ...` line and exit 2."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from cluster.cli.main import main
from tests.conftest import DEMO_CONFIG
from tests.unit.actors.weights.tiny_demo import Usage, make_tiny_source, use_tiny_demo

SOURCE = "smollm2-135m-instruct"
BUILD = ["demo", "build", "--config", str(DEMO_CONFIG), "--source", SOURCE]


@pytest.fixture
def cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    use_tiny_demo(monkeypatch, make_tiny_source(tmp_path_factory.mktemp("tiny-source")))
    monkeypatch.setenv("COE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[coe] error: ")]


def test_a_full_disk_is_one_error_line(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(1 << 30, 1 << 30, 0))
    assert main(BUILD) == 2
    (line,) = error_lines(capsys.readouterr().out)
    assert line.startswith(f"[coe] error: disk full: building {SOURCE} needs about")
    assert not (cache / SOURCE).exists()


def test_a_held_lock_past_the_wait_timeout_is_one_error_line(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache.mkdir()
    # flock locks belong to an open file: a second open in this process is "another build".
    other = os.open(cache / ".build.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        assert main([*BUILD, "--wait-timeout", "0"]) == 2
    finally:
        os.close(other)
    out = capsys.readouterr().out
    (line,) = error_lines(out)
    assert "another build" in line and str(cache) in line and "--wait-timeout" in line
    assert f"waiting for another build of {cache}" in out
    assert not (cache / SOURCE).exists()


def test_the_build_then_succeeds(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BUILD, "--wait-timeout", "10"]) == 0
    assert f"{SOURCE}: {cache / SOURCE}" in capsys.readouterr().out
