"""Helpers for driving the README's commands as a user would."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import PROJECT_ROOT

VENV_BIN = Path(PROJECT_ROOT) / ".venv" / "bin"


class Process:
    """A command in its own process group whose output is read line by line."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, fragment: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if fragment in line:
                return line
        raise AssertionError(f"never saw {fragment!r}; output:\n{''.join(self.output[-60:])}")

    def interrupt(self, timeout_s: float = 120) -> int:
        """Ctrl-C as a terminal sends it: SIGINT to the whole process group."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise
        # Everyone in the group holding the pipe must have exited for it to end.
        self.pump.join(timeout=timeout_s)
        assert not self.pump.is_alive(), "a process of the group outlived the interrupt"
        return code


def run(command: list[str], env: dict[str, str] | None = None, timeout_s: float = 300) -> str:
    done = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def wait_for_serve_status(dashboard_url: str, env: dict[str, str], timeout_s: float) -> None:
    """Poll `serve status` until the application runs; fail at once if its deploy failed."""
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = run([str(VENV_BIN / "serve"), "status", "-a", dashboard_url], env=env)
        if "DEPLOY_FAILED" in status:
            raise AssertionError(f"serve deploy failed:\n{status}")
        if "status: RUNNING" in status:
            return
        time.sleep(1)  # each `serve status` is a process start of its own, about two seconds
    raise AssertionError(f"not RUNNING within {timeout_s}s:\n{status}")


def wait_for_completion(url: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """POST until the application answers 200 (it may still be deploying)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            if response.status_code == 200:
                answer: dict[str, Any] = response.json()
                return answer
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as error:
            last = repr(error)
        time.sleep(3)
    raise AssertionError(f"no completion from {url} within {timeout_s}s; last: {last}")


def port_is_closed(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0
