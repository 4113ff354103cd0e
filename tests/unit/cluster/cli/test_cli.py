from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cluster.cli.main import main
from tests.conftest import DEMO_CONFIG, free_port


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


def test_serve_refuses_a_taken_port_before_starting_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    out = capsys.readouterr().out
    assert f"cannot bind the HTTP port {port} on 127.0.0.1 (Address already in use)" in out
    assert "starting Ray" not in out and "[demo]" not in out


def test_taken_grpc_port_is_named_and_free_ports_pass() -> None:
    from cluster.cli.serve_command import taken_ports
    from cluster.config import ServeSettings

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        free = free_port()
        problems = taken_ports(ServeSettings(port=free, grpc_port=taken))
    assert problems == [
        f"cannot bind the gRPC port {taken} on 127.0.0.1 (Address already in use); stop "
        "what holds it or choose another (serve.grpc_port)"
    ]
    assert taken_ports(ServeSettings(port=free)) == []


def test_an_unresolvable_host_is_left_for_serve_to_report() -> None:
    from cluster.cli.serve_command import bind_problem

    assert bind_problem("no-such-host.invalid", free_port()) is None


def test_free_ports_come_from_outside_the_ephemeral_and_ray_ranges() -> None:
    ports = {free_port() for _ in range(20)}
    assert all(20000 <= port < 32768 for port in ports)
    assert len(ports) > 1  # drawn at random, so parallel suites rarely collide


def test_unknown_command_exits_with_usage() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["launch"])
    assert caught.value.code == 2
