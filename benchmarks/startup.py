"""Start-up time and memory of the served demo, measured from the outside.

    .venv/bin/python -m benchmarks.startup --json out/startup.json [--cold]

Starts `coe serve` on a free loopback port, times it to "ready", sends one real
request, reads the memory of every process in its session (RSS, and PSS, which
splits shared pages such as the memory-mapped weights fairly), then stops it with
SIGINT and times the shutdown. `--cold` builds the demo weights into an empty
cache directory first, as on a fresh machine. Writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from cluster.console import COE_PREFIX

PROJECT_ROOT = Path(__file__).resolve().parent.parent
QUESTION = {
    "model": "coe",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
}


# How `coe serve` says it is ready ("... already in use" must not match).
READY_LINE = f"{COE_PREFIX}ready in "


# Ports handed to servers started here come from below the kernel's ephemeral range
# (32768-60999 on Linux) and above Ray's worker ports (10002-19999). A port the kernel
# hands out could be taken, between the probe and the server's bind, by any outgoing
# connection or by a Ray component that asks for port 0, as Ray's start-up makes many.
_SERVER_PORTS = range(20000, 32768)


def free_port() -> int:
    """A loopback port nobody is bound to right now, outside the ranges others draw from."""
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(_SERVER_PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {_SERVER_PORTS}")


def session_memory(session_id: int) -> dict[str, int]:
    """Summed RSS and PSS (bytes) of every process in a session (Ray's included)."""
    rss = pss = count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session_id:
                continue
            fields = dict(
                line.split(":", 1) for line in (entry / "smaps_rollup").read_text().splitlines()[1:]
            )
        except (OSError, ProcessLookupError, ValueError):
            continue
        rss += int(fields["Rss"].split()[0]) * 1024
        pss += int(fields["Pss"].split()[0]) * 1024
        count += 1
    return {"processes": count, "rss_bytes": rss, "pss_bytes": pss}


def measure(cold: bool, timeout_s: float) -> dict[str, Any]:
    port = free_port()
    env = dict(os.environ)
    cache = tempfile.mkdtemp(prefix="coe-cold-cache-") if cold else None
    if cache:
        env["COE_CACHE_DIR"] = cache
    command = [sys.executable, "-m", "cluster.cli", "serve", "--port", str(port)]
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    ready_s = None
    for line in process.stdout:
        print(line, end="", file=sys.stderr)
        if line.startswith(READY_LINE):
            ready_s = time.monotonic() - started
            break
        if time.monotonic() - started > timeout_s:
            break
    if ready_s is None:
        os.killpg(process.pid, signal.SIGKILL)
        raise SystemExit("the server never became ready")
    request_started = time.monotonic()
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=QUESTION, timeout=120)
    first_request_s = time.monotonic() - request_started
    memory = session_memory(process.pid)
    stop_started = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=120)
    for _ in process.stdout:
        pass  # drain until every process of the session has closed the pipe
    return {
        "cold": cold,
        "ready_s": round(ready_s, 1),
        "first_request_s": round(first_request_s, 2),
        "shutdown_s": round(time.monotonic() - stop_started, 1),
        "answer": answer.json()["choices"][0]["message"]["content"],
        "expert": answer.json()["coe"]["expert"],
        **memory,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")
    parser.add_argument("--cold", action="store_true", help="build the demo into an empty cache")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="give up after this long")
    args = parser.parse_args()
    result = measure(args.cold, args.timeout_s)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
