"""`coe serve` as a whole process under faults: an object store too small for the
experts (they spill to disk), then the process killed with SIGKILL and started again.

Three tiny synthetic experts on one executor, an arena (arena_copy) that holds one of
them, and `serve.object_store_bytes` below the three experts' packed bytes: packing
spills, and a switch restores the expert from disk. Every answer must equal the
expert's own answer loaded whole. Then the `coe serve` process alone is killed with
SIGKILL (its Ray processes are not signalled), and `coe serve` is started again on the
same config and port: the killed run's arena must be gone, and it must serve. Ctrl-C
then stops it cleanly, leaving no arena.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from benchmarks.startup import READY_LINE
from cluster.config import CoEConfig, parse_config
from tests.conftest import PROJECT_ROOT, free_port
from tests.e2e.conftest import VENV_BIN, Process, port_is_closed

pytestmark = pytest.mark.e2e

APP = "process-faults"
EXPERTS = ["spill-a", "spill-b", "spill-c"]
PROMPT = "Hello there"
# Ray's smallest object store (75 MiB) and a little more; three experts take ~114 MB.
OBJECT_STORE_BYTES = 80_000_000
# hidden 96: each expert packs ~38 MB at float32, almost all of it the 49k-token
# embedding and output matrices of the SmolLM2 tokenizer it borrows.
HIDDEN_SIZE = 96
READY_S = 600.0
CLIENT_TIMEOUT_S = 120.0
# The killed run's Ray processes: how long to watch them before they count as lingering.
# All but Ray's dashboard and runtime-env agents exit within about three seconds of the
# kill; those two outlive a minute, so a longer watch only delays the restart.
LINGER_S = 6.0


def tokenizer_source() -> Path:
    """The demo's SmolLM2 checkpoint (built if needed), whose tokenizer the experts use."""
    from cluster.console import sayer
    from cluster.setup_steps import prepare_checkpoints

    config = parse_config(
        {
            "experts": [{"name": "tok", "demo_source": "smollm2-135m-instruct", "params_b": 0.135}],
            "categories": [{"name": "general", "examples": ["Hello"]}],
            "category_map": {"general": "tok"},
            "generalist": "tok",
        },
        "tokenizer-source",
    )
    return prepare_checkpoints(config, progress=sayer("[demo] ", flush=False))["tok"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from actors.weights.synthetic import TinyShape, build_tiny_expert

    root = tmp_path_factory.mktemp("spill-experts")
    tokenizer = tokenizer_source()
    shape = TinyShape(hidden_size=HIDDEN_SIZE)
    return {
        name: build_tiny_expert(root / name, seed, tokenizer, shape)
        for seed, name in enumerate(EXPERTS, start=500)
    }


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[str, str]:
    """Each expert loaded whole (its own from_pretrained copy), greedy answers."""
    from actors.engines.base import ChatMessage, GenerationRequest
    from actors.engines.transformers_engine import TransformersEngine
    from actors.expert_server import ExpertServer

    answers = {}
    for name in EXPERTS:
        server = ExpertServer(name, TransformersEngine(name, checkpoints[name]), f"You are {name}.")
        request = GenerationRequest(
            messages=(ChatMessage(role="user", content=PROMPT),), max_tokens=6
        )
        answers[name] = server.generate(request).text
    return answers


def config_data(checkpoints: dict[str, Path], arena_dir: Path, port: int) -> dict[str, Any]:
    from memory_tiers.packing import checkpoint_nbytes

    size = checkpoint_nbytes(checkpoints[EXPERTS[0]], "float32")
    assert size * len(EXPERTS) > OBJECT_STORE_BYTES * 1.3, "the experts must not fit"
    return {
        "experts": [
            {
                "name": name,
                "checkpoint": str(checkpoints[name]),
                "params_b": 0.01,
                "system_prompt": f"You are {name}.",
            }
            for name in EXPERTS
        ],
        "categories": [{"name": "general", "examples": ["Hello"]}],
        "category_map": {"general": EXPERTS[0]},
        "generalist": EXPERTS[0],
        "router": {"num_cpus": 0},
        "tiers": {
            "enabled": True,
            "hbm_budget_bytes": int(size * 1.5),  # one expert at a time: every ask switches
            "eviction": "lru",
            "arena_dir": str(arena_dir),
            "cpu_binding": "arena_copy",  # an arena file, as a GPU's device memory
        },
        "executors": {"enabled": True, "replicas": 1, "num_cpus": 0},
        "serve": {
            "app_name": APP,
            "port": port,
            "ingress_num_cpus": 0,
            "object_store_bytes": OBJECT_STORE_BYTES,
            "api_key_env": None,
        },
    }


def arena_names(config: CoEConfig) -> list[str]:
    from cluster.serve.placement_replica import arena_files

    pattern = arena_files(config)
    return sorted(name for name in os.listdir(config.tiers.arena_dir) if pattern.fullmatch(name))


def session_processes(session: int) -> dict[int, str]:
    """Every live process in the session `session` (start_new_session made the server
    its leader; Ray's processes and workers inherit it), with its command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == session:
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:100]
    return found


def kill_session(session: int, within_s: float = 30.0) -> dict[int, str]:
    """SIGKILL every process of `session` until none is left (bounded); returns the ones
    that were alive at the first pass."""
    first = session_processes(session)
    deadline = time.monotonic() + within_s
    left = first
    while left and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        left = session_processes(session)
    assert not left, f"still alive after SIGKILL: {left}"
    return first


def ask(port: int, expert: str) -> httpx.Response:
    body = {
        "model": expert,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 6,
        "temperature": 0,
    }
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    return httpx.post(url, json=body, timeout=CLIENT_TIMEOUT_S)


def assert_every_expert_answers(port: int, references: dict[str, str]) -> None:
    for expert in [*EXPERTS, *EXPERTS]:  # the arena holds one: every ask is a switch
        response = ask(port, expert)
        assert response.status_code == 200, response.text
        assert response.headers["x-coe-expert"] == expert
        answer = response.json()["choices"][0]["message"]["content"]
        assert answer == references[expert], f"{expert} answered unlike its whole copy"


def tiers_report() -> str:
    """`coe tiers` as an operator runs it, against the running cluster."""
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "tiers", "--app", APP],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def object_store_stats() -> dict[str, int]:
    """What Ray spilled to disk and restored (`ray memory --stats-only`), as an operator
    asks the running cluster."""
    from benchmarks.scale_metrics import parse_store_stats

    done = subprocess.run(
        [str(VENV_BIN / "ray"), "memory", "--stats-only"],
        cwd=PROJECT_ROOT,
        # The local cluster uses token auth; the ray CLI sends its token only when told.
        env={**os.environ, "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return parse_store_stats(done.stdout)


@dataclass
class Setup:
    """One test's application: its config file, port, arena directory, and the `coe
    serve` processes started on it."""

    config_file: Path
    config: CoEConfig
    port: int
    arena_dir: Path
    servers: list[Process] = field(default_factory=list)

    def start(self) -> Process:
        command = [sys.executable, "-m", "cluster.cli", "serve", "--config", str(self.config_file)]
        self.servers.append(Process(command))
        return self.servers[-1]


@pytest.fixture
def setup(checkpoints: dict[str, Path], tmp_path: Path) -> Iterator[Setup]:
    """The config; at the end, whatever is left of the servers (the killed run's Ray
    processes included) is killed, and the application's arenas are removed."""
    from cluster.serve.lifecycle import remove_arena

    shm = Path("/dev/shm")
    arena_dir = shm if shm.is_dir() else tmp_path
    port = free_port()
    data = config_data(checkpoints, arena_dir, port)
    config_file = tmp_path / "spill.yaml"
    config_file.write_text(yaml.safe_dump(data))
    config = parse_config(data, str(config_file))
    remove_arena(config)  # left by an earlier run of this test that was itself killed
    state = Setup(config_file, config, port, arena_dir)
    try:
        yield state
    finally:
        for server in state.servers:
            left = kill_session(server.process.pid)
            if left:
                print(f"teardown killed {len(left)} processes of session {server.process.pid}")
        remove_arena(config)


@pytest.mark.timeout(1200)
def test_spilled_experts_serve_and_a_killed_serve_restarts_clean(
    setup: Setup, references: dict[str, str]
) -> None:
    config, port, arena_dir = setup.config, setup.port, setup.arena_dir

    # 1. Packing spills; every expert still answers as itself.
    first = setup.start()
    started = time.monotonic()
    first.wait_for(READY_LINE, timeout_s=READY_S)
    print(f"first start ready in {time.monotonic() - started:.1f}s")
    assert "object store 80 MB" in "".join(first.output)
    assert_every_expert_answers(port, references)
    report = tiers_report()
    print(report)
    store = object_store_stats()
    print(f"object store: {store}")
    # Packing spilled, and switching an expert back in restored it from disk; the
    # placement service counts those switches itself, as `coe tiers` shows.
    assert store["spilled_objects"] >= 1 and store["restored_objects"] >= 1, store
    assert "restored from disk" in report, report
    [stale] = arena_names(config)

    # 2. SIGKILL the `coe serve` process alone, as an OOM killer or `kill -9` would.
    session = first.process.pid
    ray_processes = {p: c for p, c in session_processes(session).items() if p != session}
    os.kill(first.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert first.process.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + LINGER_S
    lingering = session_processes(session)
    while lingering and time.monotonic() < deadline:
        time.sleep(1)
        lingering = session_processes(session)
    print(
        f"the killed run had {len(ray_processes)} Ray processes; "
        f"{len(lingering)} still alive {LINGER_S:.0f}s after the kill:\n"
        + "\n".join(f"  {pid} {command}" for pid, command in sorted(lingering.items()))
    )
    assert (arena_dir / stale).exists(), "the arena outlives a killed cluster until a restart"

    # 3. Started again on the same config and port: the stale arena goes, it serves.
    second = setup.start()
    started = time.monotonic()
    second.wait_for(READY_LINE, timeout_s=READY_S)
    print(f"restart ready in {time.monotonic() - started:.1f}s")
    assert not (arena_dir / stale).exists(), f"the killed run's arena {stale} is still there"
    [live] = arena_names(config)
    assert live != stale
    assert_every_expert_answers(port, references)
    print(f"the killed run's processes alive now: {sorted(session_processes(session).values())}")

    # 4. Ctrl-C: a clean stop leaves no arena and frees the port.
    code = second.interrupt()
    output = "".join(second.output)
    assert "[coe] stopped" in output, output[-3000:]
    assert code in (0, -signal.SIGINT, 130), code
    assert not arena_names(config), arena_names(config)
    assert port_is_closed(port)
    left = sorted(session_processes(session).values())
    print(f"the killed run's processes alive {time.monotonic() - killed_at:.0f}s after: {left}")
