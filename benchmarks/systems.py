"""The three systems the comparison runs, each a Serve application started and stopped here.

- `coe`: the CoE cluster with tiered placement: every expert's weights in the object
  store (DDR), a device arena (HBM) sized for `hbm_experts` of them, prefetch, and the
  expert autoscaling policy.
- `multiplex`: one deployment serving every expert through `@serve.multiplexed` with
  K models per replica, each load a `from_pretrained` (benchmarks/multiplex_app.py).
- `resident`: the CoE cluster with the tiers off: every expert loaded in its own
  replica all the time.

All three serve the same experts from the same checkpoint files behind the same ingress
code, on one Ray instance, one after the other on the same port.

Memory is reported two ways. `peak_memory_bytes` is the device-tier memory the system
holds expert weights in (HBM on an accelerator): the arena for `coe`, the loaded models
for `multiplex` and `resident`. `peak_host_memory_bytes` is the host memory the system
holds: the summed PSS of its replica processes (the shared arena counted once) plus the
expert weights it keeps in the object store (only `coe` keeps any there).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import PROJECT_ROOT, CoEConfig, ServeSettings, load_config, parse_config
from cluster.console import Say
from cluster.serve import lifecycle
from cluster.serve.app import PLACEMENT_NAME, build_app
from memory_tiers.packing import checkpoint_nbytes

SYSTEMS = ("coe", "multiplex", "resident")
APP_NAME = "bench"
SAMPLE_INTERVAL_S = 1.0
READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Scenario:
    """The experts every system serves and the device budget the tiered ones get."""

    experts: int
    hbm_experts: int
    checkpoint: Path  # the source checkpoint every expert is a copy of
    copies_dir: Path  # where each expert's own copy lives (see expert_checkpoints)
    params_b: float = 0.135
    max_models: int = 3  # K of the multiplex baseline
    # Experts of `coe` that may execute at once (tiers.active_slots). None: every expert
    # the arena holds, since a CPU has no SRAM to bound that number.
    active_slots: int | None = None
    # Each expert deployment's autoscaling (cluster.config.AutoscalingSettings fields).
    autoscaling: tuple[tuple[str, Any], ...] = (
        ("policy", "coe"),
        ("idle", "park"),
        ("max_replicas", 1),
    )

    def __post_init__(self) -> None:
        if self.experts < 2:
            raise ValueError(f"experts must be >= 2, got {self.experts}")
        if not 1 <= self.hbm_experts <= self.experts:
            raise ValueError(f"hbm_experts must be in [1, {self.experts}], got {self.hbm_experts}")
        if self.max_models < 1:
            raise ValueError(f"max_models (K) must be >= 1, got {self.max_models}")
        if self.active_slots is not None and self.active_slots < 1:
            raise ValueError(f"active_slots must be >= 1, got {self.active_slots}")

    @property
    def names(self) -> list[str]:
        """Expert names in popularity rank order (the Zipf sampler's rank 1 first)."""
        return [f"e{rank}" for rank in range(1, self.experts + 1)]

    @property
    def expert_bytes(self) -> int:
        return checkpoint_nbytes(self.checkpoint, "float32")

    @property
    def hbm_budget_bytes(self) -> int:
        # Half an expert of slack: room for `hbm_experts`, never one more.
        return int(self.expert_bytes * (self.hbm_experts + 0.5))

    def config(self, tiers: bool) -> CoEConfig:
        names = self.names
        autoscaling = dict(self.autoscaling)
        return parse_config(
            {
                "experts": [
                    {
                        "name": name,
                        "checkpoint": str(self.copies_dir / name),
                        "params_b": self.params_b,
                        "system_prompt": f"You are assistant number {rank}. Answer briefly.",
                        "autoscaling": autoscaling,
                        "ray_actor_options": {"num_cpus": 0},
                    }
                    for rank, name in enumerate(names, start=1)
                ],
                "categories": [{"name": "general", "examples": ["Hello"]}],
                "category_map": {"general": names[0]},
                "generalist": names[0],
                "tiers": {
                    "enabled": tiers,
                    "hbm_budget_bytes": self.hbm_budget_bytes,
                    "eviction": "lru",
                    "pinned": [],
                    "active_slots": self.active_slots or self.hbm_experts,
                },
                "serve": {"app_name": APP_NAME, "ingress_num_cpus": 0},
            },
            "benchmark scenario",
        )

    def checkpoints(self) -> dict[str, Path]:
        return {name: self.copies_dir / name for name in self.names}

    def prepare(self, say: Say) -> None:
        """Give every expert its own checkpoint files.

        Experts that shared one file would share its page-cache pages, and a system that
        maps weights (from_pretrained does) would look like it held one expert's bytes
        for all of them. Distinct files cost what distinct experts cost.
        """
        for name in self.names:
            copy_checkpoint(self.checkpoint, self.copies_dir / name, say)


def copy_checkpoint(source: Path, target: Path, say: Say) -> None:
    """Copy a checkpoint directory file by file; files already copied whole are kept."""
    target.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if not item.is_file():
            continue
        destination = target / item.name
        if destination.exists() and destination.stat().st_size == item.stat().st_size:
            continue
        if item.stat().st_size > 1 << 20:
            say(f"copying {item.name} to {target}")
        partial = destination.with_name(destination.name + ".partial")
        shutil.copyfile(item, partial)
        partial.replace(destination)


def demo_scenario(experts: int, hbm_experts: int, say: Say, **options: Any) -> Scenario:
    """A scenario whose experts are copies of the demo's SmolLM2-135M-Instruct."""
    checkpoint = demo_checkpoint(say)
    return Scenario(
        experts=experts,
        hbm_experts=hbm_experts,
        checkpoint=checkpoint,
        copies_dir=checkpoint.parent / "bench-experts",
        **options,
    )


def demo_checkpoint(say: Say) -> Path:
    """The demo's SmolLM2-135M-Instruct checkpoint, built on first use."""
    from cluster.setup_steps import prepare_checkpoints

    config = load_config(PROJECT_ROOT / "configs" / "demo.yaml")
    return prepare_checkpoints(config, progress=say)["generalist"]


def replica_memory_bytes(app_name: str) -> int:
    """Summed PSS of the application's replica processes (shared pages split fairly)."""
    import psutil

    prefix = f"ray::ServeReplica:{app_name}:"
    total = 0
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if not cmdline or not cmdline[0].startswith(prefix):
            continue
        try:
            total += int(process.memory_full_info().pss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


@dataclass
class Timeline:
    """Replicas per deployment and resident experts, sampled once a second."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    peak_host_bytes: int = 0


class RunningSystem:
    """One system's Serve application, sampled in a background thread while it runs."""

    def __init__(self, name: str, scenario: Scenario, route_prefix: str = "/") -> None:
        if name not in SYSTEMS:
            raise ValueError(f"unknown system {name!r}; known: {list(SYSTEMS)}")
        self.name = name
        self.scenario = scenario
        self.route_prefix = route_prefix
        self.timeline = Timeline()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._object_store_bytes = 0
        self._started = 0.0

    def start(self) -> None:
        from ray import serve

        from benchmarks.multiplex_app import build_multiplex_app

        scenario = self.scenario
        if self.name == "multiplex":
            app = build_multiplex_app(
                scenario.config(tiers=False), scenario.checkpoints(), scenario.max_models
            )
        else:
            app = build_app(scenario.config(tiers=self.name == "coe"), scenario.checkpoints())
        lifecycle.run_app(app, APP_NAME, self.route_prefix)
        if self.name == "coe":
            placement = serve.get_deployment_handle(PLACEMENT_NAME, APP_NAME)
            ddr = placement.metrics.remote().result(timeout_s=30)["ddr"]
            self._object_store_bytes = int(ddr["bytes"])
        self._started = time.monotonic()
        # A first sample now, so a run shorter than the interval still has a timeline.
        self._record_sample()
        self._sampler = threading.Thread(target=self._sample_forever, daemon=True)
        self._sampler.start()

    def elapsed_s(self) -> float:
        """Seconds since the system was ready: the clock of the timeline's samples."""
        return time.monotonic() - self._started

    def _sample_forever(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._record_sample()

    def _record_sample(self) -> None:
        try:
            self.timeline.samples.append(self.sample())
        except Exception as error:  # a missed sample must not end the run
            logging.getLogger(__name__).warning("sample failed: %s", error)

    def sample(self) -> dict[str, Any]:
        from ray import serve

        from cluster.serve.ray_internals import running_replicas

        host = replica_memory_bytes(APP_NAME) + self._object_store_bytes
        self.timeline.peak_host_bytes = max(self.timeline.peak_host_bytes, host)
        app = serve.status().applications.get(APP_NAME)
        replicas = {}
        if app is not None:
            for deployment, status in app.deployments.items():
                if deployment in ("ingress", "router", PLACEMENT_NAME):
                    continue
                replicas[deployment] = running_replicas(status)
        return {
            "t": self.elapsed_s(),
            "replicas": replicas,
            "resident": self.resident(),
            "host_bytes": host,
        }

    def resident(self) -> list[str]:
        from ray import serve

        if self.name == "resident":
            return list(self.scenario.names)
        if self.name == "multiplex":
            info = serve.get_deployment_handle("multiplexed-experts", APP_NAME).info.remote()
            return list(info.result(timeout_s=10)["loaded"])
        placement = serve.get_deployment_handle(PLACEMENT_NAME, APP_NAME)
        device = placement.residency.remote().result(timeout_s=10)["host0"]
        return [r["expert"] for r in device["residents"]]

    def stats(self, requests: int) -> dict[str, Any]:
        """Switches, HBM hit rate and memory; call before `stop`."""
        from ray import serve

        # A last sample, so the peaks include the state at the end of the run.
        self._record_sample()

        scenario = self.scenario
        if self.name == "resident":
            switches, hits = 0, requests
            device_bytes = scenario.expert_bytes * scenario.experts
        elif self.name == "multiplex":
            info = serve.get_deployment_handle("multiplexed-experts", APP_NAME).info.remote()
            found = info.result(timeout_s=10)
            switches, hits = found["loads"], max(0, found["requests"] - found["loads"])
            device_bytes = int(found["peak_loaded_bytes"])
        else:
            placement = serve.get_deployment_handle(PLACEMENT_NAME, APP_NAME)
            device = placement.metrics.remote().result(timeout_s=10)["devices"]["host0"]
            switches, hits = int(device["switches"]), int(device["hits"])
            device_bytes = scenario.hbm_budget_bytes
        lookups = max(1, switches + hits)
        return {
            **self.batching(),
            "switches": switches,
            "hbm_hit_rate": hits / lookups,
            "peak_memory_bytes": device_bytes,
            "peak_host_memory_bytes": self.timeline.peak_host_bytes,
        }

    def batching(self) -> dict[str, Any]:
        """How the expert replicas batched (warm-up requests included); the multiplex
        baseline runs every request alone."""
        from ray import serve

        from cluster.serve.app import expert_deployment_name

        if self.name == "multiplex":
            return {"batches": None, "batched_requests": None, "largest_batch": 1}
        infos = [
            serve.get_deployment_handle(expert_deployment_name(name), APP_NAME)
            .info.remote()
            .result(timeout_s=10)
            for name in self.scenario.names
        ]
        return {
            "batches": sum(i["batches"] for i in infos),
            "batched_requests": sum(i["batched_requests"] for i in infos),
            "largest_batch": max(i["largest_batch"] for i in infos),
        }

    def stop(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=15)
        with_arena = self.scenario.config(tiers=True) if self.name == "coe" else None
        lifecycle.undeploy(APP_NAME, with_arena)


def serve_instance(port: int) -> AbstractContextManager[str]:
    """A local Ray + Serve for the benchmark, HTTP only on loopback; yields the base URL."""
    return lifecycle.local_serve(ServeSettings(host="127.0.0.1", port=port))


@contextmanager
def running(
    name: str, scenario: Scenario, say: Say, route_prefix: str = "/"
) -> Iterator[RunningSystem]:
    system = RunningSystem(name, scenario, route_prefix)
    started = time.monotonic()
    say(f"[{name}] starting")
    system.start()
    say(f"[{name}] ready in {time.monotonic() - started:.1f}s")
    try:
        yield system
    finally:
        system.stop()
        say(f"[{name}] stopped")
