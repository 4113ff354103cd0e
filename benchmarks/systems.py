"""The systems the benchmarks run, each a Serve application started and stopped here.

- `coe`: the CoE cluster with tiered placement: every expert's weights in the object
  store (DDR), a device arena (HBM) sized for `hbm_experts` of them, prefetch, and the
  expert autoscaling policy. With `executor_replicas`, every expert runs on that many
  executor replicas (the `executors:` section) instead of a deployment of its own.
- `multiplex`: one deployment serving every expert through `@serve.multiplexed` with
  K models per replica, each load a `from_pretrained` (benchmarks/multiplex_app.py).
- `resident`: the CoE cluster with the tiers off: every expert loaded in its own
  replica all the time.
- `zero`: the CoE cluster with the tiers off and every expert a deployment of its own
  scaled to zero: the first request for an expert starts its process.

All of them serve the same experts from the same checkpoint files behind the same
ingress code, on one Ray instance, one after the other on the same port.
`benchmarks/compare.py` runs the first three (`SYSTEMS`); `benchmarks/scale.py` runs
`coe` (on executors), `multiplex` and `zero`.

Memory is reported two ways. `peak_memory_bytes` is the device-tier memory the system
holds expert weights in (HBM on an accelerator): the arena for `coe`, the loaded models
for `multiplex` and `resident`. `peak_host_memory_bytes` is the host memory the system
holds: the summed PSS of its replica processes (the shared arena counted once) plus the
expert weights it keeps in the object store (only `coe` keeps any there). Each sample
also counts the replica processes and splits their PSS into what they map of Ray's
object store and everything else (`ProcessMemory`).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness.memory import ProcessMemory, replica_memory
from cluster.config import PROJECT_ROOT, CoEConfig, ServeSettings, load_config, parse_config
from cluster.console import Say
from cluster.serve import lifecycle
from cluster.serve.app import (
    EXECUTOR_NAME,
    INGRESS_NAME,
    PLACEMENT_NAME,
    ROUTER_NAME,
    build_app,
    expert_deployment_name,
)
from memory_tiers.packing import checkpoint_nbytes

SYSTEMS = ("coe", "multiplex", "resident")  # what benchmarks/compare.py runs
ALL_SYSTEMS = (*SYSTEMS, "zero")
APP_NAME = "bench"
SAMPLE_INTERVAL_S = 1.0
READY_TIMEOUT_S = 600.0


# `zero`: no replica until a request comes, back to none after `Scenario.zero_idle_s`.
ZERO_AUTOSCALING: dict[str, Any] = {
    "policy": "coe",
    "idle": "zero",
    "min_replicas": 0,
    "initial_replicas": 0,
    "max_replicas": 1,
}


@dataclass(frozen=True)
class Scenario:
    """The experts every system serves and the device budget the tiered ones get."""

    experts: int
    hbm_experts: int
    checkpoint: Path  # the source checkpoint every expert is a copy of (without expert_dirs)
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
    # Each expert's own checkpoint in rank order, used where it is (experts with distinct
    # weights); None: every expert is a copy of `checkpoint` under `copies_dir`.
    expert_dirs: tuple[Path, ...] | None = None
    # The arena's budget; None: `hbm_experts` experts of `checkpoint`'s size, and a half.
    budget_bytes: int | None = None
    # `coe` runs every expert on an executor pool of this many replicas; None: a
    # deployment per expert.
    executor_replicas: int | None = None
    max_experts_per_replica: int | None = None  # executors: None is the config's default
    multiplex_replicas: int = 1
    zero_idle_s: float = 300.0  # `zero`: seconds without a request before 1 -> 0 replicas
    # Share of one GPU per serving replica (0: CPU only). `coe` then keeps its arena on
    # the GPU (tiers.device cuda) and executors map it; `multiplex` and `zero` load
    # each expert onto their share with from_pretrained.
    gpu_share: float = 0.0

    def __post_init__(self) -> None:
        if self.experts < 2:
            raise ValueError(f"experts must be >= 2, got {self.experts}")
        if not 1 <= self.hbm_experts <= self.experts:
            raise ValueError(f"hbm_experts must be in [1, {self.experts}], got {self.hbm_experts}")
        if self.max_models < 1:
            raise ValueError(f"max_models (K) must be >= 1, got {self.max_models}")
        if self.active_slots is not None and self.active_slots < 1:
            raise ValueError(f"active_slots must be >= 1, got {self.active_slots}")
        if self.expert_dirs is not None and len(self.expert_dirs) != self.experts:
            raise ValueError(
                f"expert_dirs names {len(self.expert_dirs)} checkpoints for {self.experts} experts"
            )
        for name in ("budget_bytes", "executor_replicas", "max_experts_per_replica"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.multiplex_replicas < 1:
            raise ValueError(f"multiplex_replicas must be >= 1, got {self.multiplex_replicas}")
        if self.zero_idle_s < 0:
            raise ValueError(f"zero_idle_s must be >= 0, got {self.zero_idle_s}")
        if not 0 <= self.gpu_share <= 1:
            raise ValueError(f"gpu_share must be in [0, 1], got {self.gpu_share}")

    @property
    def names(self) -> list[str]:
        """Expert names in popularity rank order (the Zipf sampler's rank 1 first)."""
        return [f"e{rank}" for rank in range(1, self.experts + 1)]

    @property
    def expert_bytes(self) -> int:
        return checkpoint_nbytes(self.checkpoint, "float32")

    def expert_sizes(self) -> dict[str, int]:
        """Each expert's weight bytes (float32), by name."""
        if self.expert_dirs is None:
            return dict.fromkeys(self.names, self.expert_bytes)
        return {name: _nbytes(path) for name, path in self.checkpoints().items()}

    @property
    def hbm_budget_bytes(self) -> int:
        if self.budget_bytes is not None:
            return self.budget_bytes
        # Half an expert of slack: room for `hbm_experts`, never one more.
        return int(self.expert_bytes * (self.hbm_experts + 0.5))

    def config(self, tiers: bool, *, executors: bool = False, zero: bool = False) -> CoEConfig:
        """The cluster config: tiered or not, on executors or a deployment per expert,
        and with `zero` every expert a deployment of its own scaled to zero."""
        names = self.names
        checkpoints = self.checkpoints()
        autoscaling = {**ZERO_AUTOSCALING, "idle_s": self.zero_idle_s} if zero else None
        pool: dict[str, Any] = {"enabled": executors, "num_cpus": 0}
        gpu = self.gpu_share > 0
        if executors and gpu:
            pool["num_gpus"] = self.gpu_share
        if executors:
            pool["replicas"] = self.executor_replicas or 1
            if self.max_experts_per_replica is not None:
                pool["max_experts_per_replica"] = self.max_experts_per_replica
        experts = []
        for rank, name in enumerate(names, start=1):
            expert: dict[str, Any] = {
                "name": name,
                "checkpoint": str(checkpoints[name]),
                "params_b": self.params_b,
                "system_prompt": system_prompt(rank),
                "chat_format": self.chat_format(checkpoints[name]),
                "dedicated": zero,
            }
            if not executors:  # pooled experts take the pool's replicas and resources
                expert["autoscaling"] = autoscaling or dict(self.autoscaling)
                expert["ray_actor_options"] = {"num_cpus": 0, "num_gpus": self.gpu_share}
            experts.append(expert)
        return parse_config(
            {
                "experts": experts,
                "categories": [{"name": "general", "examples": ["Hello"]}],
                "category_map": {"general": names[0]},
                "generalist": names[0],
                "tiers": {
                    "enabled": tiers,
                    "hbm_budget_bytes": self.hbm_budget_bytes,
                    "eviction": "lru",
                    "pinned": [],
                    "active_slots": self.active_slots or self.hbm_experts,
                    "device": "cuda" if gpu and tiers else "cpu",
                },
                "executors": pool,
                "serve": {"app_name": APP_NAME, "ingress_num_cpus": 0},
            },
            "benchmark scenario",
        )

    def system_config(self, system: str) -> CoEConfig:
        """The config `system` runs (the multiplex baseline reads its experts and limits)."""
        if system == "coe":
            return self.config(tiers=True, executors=self.executor_replicas is not None)
        return self.config(tiers=False, zero=system == "zero")

    def chat_format(self, checkpoint: Path) -> str:
        """Copies of the demo checkpoint have its chat template; an expert of its own
        (a base model among them) speaks through a transcript when it has none."""
        if self.expert_dirs is None:
            return "template"
        return chat_format_of(checkpoint)

    def checkpoints(self) -> dict[str, Path]:
        if self.expert_dirs is not None:
            return dict(zip(self.names, self.expert_dirs, strict=True))
        return {name: self.copies_dir / name for name in self.names}

    def prepare(self, say: Say) -> None:
        """Give every expert its own checkpoint files.

        Experts that shared one file would share its page-cache pages, and a system that
        maps weights (from_pretrained does) would look like it held one expert's bytes
        for all of them. Distinct files cost what distinct experts cost. Experts with
        checkpoints of their own (`expert_dirs`) are used where they are.
        """
        if self.expert_dirs is not None:
            return
        for name in self.names:
            copy_checkpoint(self.checkpoint, self.copies_dir / name, say)


def system_prompt(rank: int) -> str:
    return f"You are assistant number {rank}. Answer briefly."


def chat_format_of(checkpoint: Path) -> str:
    """'template' when the checkpoint's tokenizer has a chat template, else 'plain'."""
    if (checkpoint / "chat_template.jinja").is_file():
        return "template"
    try:
        tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return "template"  # nothing to read: let the engine report what is missing
    return "template" if tokenizer_config.get("chat_template") else "plain"


@functools.cache
def _nbytes(checkpoint: Path) -> int:
    return checkpoint_nbytes(checkpoint, "float32")


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
    return demo_checkpoints(say)["generalist"]


def demo_checkpoints(say: Say) -> dict[str, Path]:
    """The demo's checkpoints by expert name, built on first use."""
    from cluster.setup_steps import prepare_checkpoints

    config = load_config(PROJECT_ROOT / "configs" / "demo.yaml")
    return prepare_checkpoints(config, progress=say)


def ready_residents(residency: dict[str, Any]) -> list[str]:
    """Experts resident and ready on any device (the host, or any GPU of the node); one
    still being copied in is not ready to serve yet."""
    return sorted(
        {r["expert"] for device in residency.values() for r in device["residents"] if r["ready"]}
    )


def device_totals(devices: dict[str, Any], *names: str) -> dict[str, int]:
    """Counters summed over the devices (one on a CPU node, one per GPU)."""
    return {name: sum(int(device[name]) for device in devices.values()) for name in names}


def replica_memory_bytes(app_name: str) -> int:
    """Summed PSS of the application's replica processes (shared pages split fairly)."""
    return replica_memory(app_name).pss_bytes


@dataclass
class Timeline:
    """Replicas per deployment, resident experts and memory, sampled once a second."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    peak_host_bytes: int = 0
    peak: ProcessMemory = field(default_factory=ProcessMemory)

    def note(self, memory: ProcessMemory) -> None:
        """Keep the peaks; per deployment, each its own peak (they need not coincide)."""
        by_deployment = dict(self.peak.outside_store_by_deployment)
        for deployment, nbytes in memory.outside_store_by_deployment.items():
            by_deployment[deployment] = max(by_deployment.get(deployment, 0), nbytes)
        self.peak = ProcessMemory(
            max(self.peak.processes, memory.processes),
            max(self.peak.pss_bytes, memory.pss_bytes),
            max(self.peak.pss_outside_store_bytes, memory.pss_outside_store_bytes),
            by_deployment,
        )


class RunningSystem:
    """One system's Serve application, sampled in a background thread while it runs."""

    def __init__(self, name: str, scenario: Scenario, route_prefix: str = "/") -> None:
        if name not in ALL_SYSTEMS:
            raise ValueError(f"unknown system {name!r}; known: {list(ALL_SYSTEMS)}")
        self.name = name
        self.scenario = scenario
        self.route_prefix = route_prefix
        self.timeline = Timeline()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._object_store_bytes = 0
        self._started = 0.0
        self._lock = threading.Lock()  # the sampler and callers share what follows
        self._infos: dict[tuple[str, Any], dict[str, Any]] = {}  # (deployment, pid) -> info
        self._running: set[str] = set()  # zero: experts with a running replica
        self.replica_starts = 0  # zero: replicas started (each a process start)
        self._peak_running_bytes = 0  # zero: weights of the experts running at once

    def start(self) -> None:
        from ray import serve

        from benchmarks.multiplex_app import build_multiplex_app

        scenario = self.scenario
        if self.name == "multiplex":
            app = build_multiplex_app(
                scenario.config(tiers=False),
                scenario.checkpoints(),
                scenario.max_models,
                scenario.multiplex_replicas,
                num_gpus=scenario.gpu_share,
            )
        else:
            app = build_app(scenario.system_config(self.name), scenario.checkpoints())
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
        memory = replica_memory(APP_NAME)
        host = memory.pss_bytes + self._object_store_bytes
        self.timeline.peak_host_bytes = max(self.timeline.peak_host_bytes, host)
        self.timeline.note(memory)
        replicas = self.replicas()
        if self.name == "zero":  # what `resident` would ask Serve again
            with self._lock:
                resident = sorted(self._running)
        else:
            resident = self.resident()
        return {
            "t": self.elapsed_s(),
            "replicas": replicas,
            "resident": resident,
            "host_bytes": host,
            "processes": memory.processes,
            "pss_bytes": memory.pss_bytes,
            "pss_outside_store_bytes": memory.pss_outside_store_bytes,
        }

    def replicas(self) -> dict[str, int]:
        """Running replicas per serving deployment (`zero` leaves out those at none: it
        has one deployment per expert, mostly at none)."""
        from ray import serve

        from cluster.serve.ray_internals import running_replicas

        app = serve.status().applications.get(APP_NAME)
        replicas = {}
        if app is not None:
            for deployment, status in app.deployments.items():
                if deployment in (INGRESS_NAME, ROUTER_NAME, PLACEMENT_NAME):
                    continue
                replicas[deployment] = running_replicas(status)
        if self.name == "zero":
            replicas = {d: n for d, n in replicas.items() if n > 0}
            self._note_running(replicas)
        return replicas

    def _note_running(self, replicas: dict[str, int]) -> None:
        """Count replica starts and the weights loaded at once (`zero`)."""
        by_deployment = {expert_deployment_name(name): name for name in self.scenario.names}
        running = {by_deployment[d] for d in replicas if d in by_deployment}
        sizes = self.scenario.expert_sizes()
        with self._lock:
            self.replica_starts += len(running - self._running)
            self._running = running
            loaded = sum(sizes[name] for name in running)
            self._peak_running_bytes = max(self._peak_running_bytes, loaded)

    def resident(self) -> list[str]:
        """The experts the system holds ready now: in the arena (`coe`), loaded in some
        replica (`multiplex`), with a running replica (`zero`), all (`resident`)."""
        from ray import serve

        if self.name == "resident":
            return list(self.scenario.names)
        if self.name == "zero":
            self.replicas()
            with self._lock:
                return sorted(self._running)
        if self.name == "multiplex":
            return sorted({name for info in self.multiplex_infos() for name in info["loaded"]})
        placement = serve.get_deployment_handle(PLACEMENT_NAME, APP_NAME)
        return ready_residents(placement.residency.remote().result(timeout_s=10))

    def multiplex_infos(self) -> list[dict[str, Any]]:
        from benchmarks.multiplex_app import MULTIPLEX_NAME

        return self.replica_infos(MULTIPLEX_NAME, self.scenario.multiplex_replicas)

    def replica_infos(self, deployment: str, replicas: int) -> list[dict[str, Any]]:
        """`info()` of each replica of `deployment`, the latest answer per process.

        A handle call reaches the replica Serve picks, so several at once reach every
        replica (Serve spreads them by queue length); one missed keeps its last answer.
        """
        from ray import serve

        handle = serve.get_deployment_handle(deployment, APP_NAME)
        calls = [handle.info.remote() for _ in range(1 if replicas == 1 else 3 * replicas)]
        answers = [call.result(timeout_s=10) for call in calls]
        with self._lock:
            for info in answers:
                self._infos[(deployment, info.get("pid"))] = info
            return [info for (name, _), info in self._infos.items() if name == deployment]

    def stats(self, requests: int) -> dict[str, Any]:
        """Switches, HBM hit rate and memory; call before `stop`."""
        from ray import serve

        # A last sample, so the peaks include the state at the end of the run.
        self._record_sample()

        scenario = self.scenario
        if self.name == "resident":
            switches, hits = 0, requests
            device_bytes = sum(scenario.expert_sizes().values())
        elif self.name == "zero":
            with self._lock:
                switches, device_bytes = self.replica_starts, self._peak_running_bytes
            hits = max(0, requests - switches)
        elif self.name == "multiplex":
            found = self.multiplex_infos()
            switches = sum(i["loads"] for i in found)
            hits = max(0, sum(i["requests"] for i in found) - switches)
            device_bytes = sum(int(i["peak_loaded_bytes"]) for i in found)
        else:
            placement = serve.get_deployment_handle(PLACEMENT_NAME, APP_NAME)
            devices = placement.metrics.remote().result(timeout_s=10)["devices"]
            totals = device_totals(devices, "switches", "hits")
            switches, hits = totals["switches"], totals["hits"]
            device_bytes = scenario.hbm_budget_bytes * len(devices)
        lookups = max(1, switches + hits)
        peak = self.timeline.peak
        return {
            **self.batching(),
            "switches": switches,
            "hbm_hit_rate": hits / lookups,
            "peak_memory_bytes": device_bytes,
            "peak_host_memory_bytes": self.timeline.peak_host_bytes,
            "processes": peak.processes,
            "peak_pss_bytes": peak.pss_bytes,
            "peak_pss_outside_store_bytes": peak.pss_outside_store_bytes,
            "peak_pss_outside_store_by_deployment": peak.outside_store_by_deployment,
            "object_store_bytes": self._object_store_bytes,
        }

    def batching(self) -> dict[str, Any]:
        """How the expert replicas batched (warm-up requests included); the multiplex
        baseline runs every request alone, and executors keep no batch counters."""
        from ray import serve

        if self.name == "multiplex":
            return {"batches": None, "batched_requests": None, "largest_batch": 1}
        if self.name == "zero" or self.scenario.executor_replicas is not None:
            # Asking a `zero` expert would start (or wait for) a replica of it.
            return {"batches": None, "batched_requests": None, "largest_batch": None}
        names = self.scenario.names
        infos = [
            serve.get_deployment_handle(expert_deployment_name(name), APP_NAME)
            .info.remote()
            .result(timeout_s=10)
            for name in names
        ]
        return {
            "batches": sum(i["batches"] for i in infos),
            "batched_requests": sum(i["batched_requests"] for i in infos),
            "largest_batch": max(i["largest_batch"] for i in infos),
        }

    def executor_infos(self) -> list[dict[str, Any]]:
        """`info()` of every executor replica (`coe` on executors only)."""
        return self.replica_infos(EXECUTOR_NAME, self.scenario.executor_replicas or 1)

    def stop(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=15)
        with_arena = self.scenario.system_config("coe") if self.name == "coe" else None
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
