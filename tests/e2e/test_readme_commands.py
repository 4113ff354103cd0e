"""The README's serve command and `serve deploy`, run from the checkout as a user runs them."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml

from benchmarks.startup import READY_LINE
from cluster.cli.serve_command import remove_arena
from cluster.config import load_config
from tests.conftest import DEMO_CONFIG, free_port
from tests.e2e.conftest import (
    VENV_BIN,
    Process,
    port_is_closed,
    run,
    wait_for_completion,
    wait_for_serve_status,
)

FRANCE = {
    "model": "coe",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
}


def test_make_serve_answers_and_shuts_down_on_ctrl_c() -> None:
    port = free_port()
    server = Process(["make", "serve", f"PORT={port}"])
    try:
        ready = server.wait_for(READY_LINE, timeout_s=900)
        assert f"http://127.0.0.1:{port}" in ready
        server.wait_for("curl -s", timeout_s=10)
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json=FRANCE, timeout=120
        )
        assert response.status_code == 200
        assert "Paris" in response.json()["choices"][0]["message"]["content"]
        assert response.json()["coe"]["expert"] == "generalist"
    finally:
        code = server.interrupt()
    output = "".join(server.output)
    assert "[coe] stopped" in output, output[-3000:]
    assert code in (0, 2, -2, 130)  # make reports an interrupted recipe in its own way
    assert port_is_closed(port)


def test_serve_fails_fast_on_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        Path("configs/demo.yaml").read_text().replace("engine: deepspeed", "engine: tgi")
    )
    server = Process([str(VENV_BIN / "coe"), "serve", "--config", str(bad)])
    assert server.process.wait(timeout=120) == 2
    output = "".join(server.output)
    assert "experts.1.engine" in output and "'tgi'" in output
    assert "starting Ray" not in output


def generalist_only(tmp_path: Path) -> Path:
    """The demo config cut to its generalist. What is under test here is `serve deploy`
    and the builder; `make serve` above and the integration suite serve all five experts."""
    data = yaml.safe_load(Path(DEMO_CONFIG).read_text())
    generalist = data["generalist"]
    data["experts"] = [e for e in data["experts"] if e["name"] == generalist]
    data["category_map"] = {category: generalist for category in data["category_map"]}
    path = tmp_path / "generalist-only.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_serve_deploy_on_a_local_cluster(tmp_path: Path) -> None:
    port = free_port()
    config = yaml.safe_load(Path("configs/serve.yaml").read_text())
    config["http_options"]["port"] = port
    (application,) = config["applications"]
    assert application["args"]["config"] == "configs/demo.yaml"  # what the README deploys
    application["args"]["config"] = str(generalist_only(tmp_path))
    deploy_file = tmp_path / "serve.yaml"
    deploy_file.write_text(yaml.safe_dump(config))
    env = {"RAY_AUTH_MODE": "token", "PATH": f"{VENV_BIN}:/usr/bin:/bin"}
    ray_port, dashboard_port = free_port(), free_port()
    ray = str(VENV_BIN / "ray")
    head = [ray, "start", "--head", f"--port={ray_port}", "--node-ip-address=127.0.0.1"]
    dashboard = ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    run(head + dashboard, env=env)
    try:
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        run([str(VENV_BIN / "serve"), "deploy", "-a", dashboard_url, str(deploy_file)], env=env)
        wait_for_serve_status(dashboard_url, env, timeout_s=600)
        url = f"http://127.0.0.1:{port}"
        answer = wait_for_completion(url, FRANCE, timeout_s=600)
        assert "Paris" in answer["choices"][0]["message"]["content"]
        assert answer["coe"]["routed"] is True
    finally:
        run([ray, "stop", "--force"], env=env)
        # `serve deploy` has no foreground process to give the shared arena back.
        remove_arena(load_config(application["args"]["config"]))
