from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from tests.conftest import DEMO_CONFIG


def test_config_check_prints_the_map(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(DEMO_CONFIG)]) == 0
    out = capsys.readouterr().out
    assert "math -> math-tutor" in out
    assert "below confidence 0.5 -> generalist" in out


def test_config_check_names_the_bad_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        DEMO_CONFIG.read_text().replace("confidence_threshold: 0.5", "confidence_threshold: 2")
    )
    assert main(["config", "check", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "router.confidence_threshold" in out and "(got 2)" in out


def test_serve_refuses_a_bad_port_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "0"]) == 2
    assert "--port 0" in capsys.readouterr().out


def test_unknown_command_exits_with_usage() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["launch"])
    assert caught.value.code == 2
