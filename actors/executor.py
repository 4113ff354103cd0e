"""An executor: one process that runs any expert whose bytes its device's arena holds.

A replica per expert costs a process per expert (interpreter, torch, transformers and
Ray: about half a gigabyte each), so a node holds a few dozen experts however small
they are. An executor instead keeps one meta-device skeleton per distinct
architecture (experts that share a base model share it) and, per batch, binds the
requested expert's arena region into it: the switch the tiers already make cheap.
What differs per expert (tokenizer, system prompt, chat format, engine settings)
lives in a light `ExecutorExpert`, so a request is always answered with its own
expert's prompt, tokenizer and weights.

Plain classes, no Ray: `cluster/serve/executor_replica.py` makes this a Serve
deployment, takes the grants and loads experts through Serve's model multiplexing.
The arena is the device's (shared with every executor on it and owned by the
placement service), so on a GPU the same executor binds device memory it never
allocates or copies itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.engines.base import BatchJob, Engine
from actors.engines.kernel_injection import shared_skeleton
from actors.expert_server import ExpertServer, make_engine
from actors.weights.tiered_weights import (
    Fetch,
    SharedSkeleton,
    TieredWeights,
    files_key,
    skeleton_key,
)
from memory_tiers.arena import DeviceArena
from memory_tiers.ddr import PLAIN_LAYOUT
from memory_tiers.grants import Grant
from memory_tiers.packing import TensorIndex
from memory_tiers.placement import ResidencyReport

EngineFactory = Callable[..., Engine]
# (checkpoint_dir, dtype, engine, layout) -> the skeleton experts of that key share.
SkeletonFactory = Callable[[Path, str, str, str], SharedSkeleton]
# The files a tokenizer is made of: experts whose files are equal share one tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)


def tokenizer_key(checkpoint_dir: Path) -> str:
    """What identifies a checkpoint's tokenizer (its files' bytes, not their place)."""
    return files_key(checkpoint_dir, TOKENIZER_FILES)


@dataclass(frozen=True)
class ExpertSpec:
    """What an executor needs to know to run one expert."""

    name: str
    checkpoint_dir: Path
    engine: str = "transformers"
    dtype: str = "float32"
    chat_format: str = "template"
    system_prompt: str = ""
    layout: str = PLAIN_LAYOUT  # how its bytes are packed (kernel_injection.packed_layout)


@dataclass
class ExecutorExpert:
    """One expert made runnable on an executor: its weights' binding and its server."""

    spec: ExpertSpec
    weights: TieredWeights
    server: ExpertServer

    @property
    def skeleton(self) -> SharedSkeleton:
        return self.weights.shared


class ExpertExecutor:
    """Builds experts on shared skeletons and runs their batches (blocking calls)."""

    def __init__(
        self,
        arena: DeviceArena | None,
        engine_factory: EngineFactory = make_engine,
        fetch: Fetch | None = None,
        skeleton_factory: SkeletonFactory = shared_skeleton,
    ) -> None:
        """`arena`: the device's shared arena, or None on a zero-copy device, where each
        grant names the expert's object-store buffer and `fetch` maps it."""
        self.arena = arena
        self.fetch = fetch
        self.engine_factory = engine_factory
        self.skeleton_factory = skeleton_factory
        self.skeletons: dict[str, SharedSkeleton] = {}
        # (skeleton key, tokenizer key) -> one tokenizer. Shared only within a skeleton,
        # whose lock serialises every use: a fast tokenizer is not safe across threads.
        self.tokenizers: dict[tuple[str, str], Any] = {}
        # Skeleton key -> the weights last bound into that skeleton (residency reports).
        self.last_bound: dict[str, TieredWeights] = {}
        self.loads = 0
        self.rebinds = 0
        self._guard = threading.Lock()  # loads run on worker threads

    def skeleton_for(self, spec: ExpertSpec) -> SharedSkeleton:
        """The skeleton `spec`'s architecture uses, built the first time it is needed."""
        key = skeleton_key(spec.checkpoint_dir, spec.dtype, spec.engine, spec.layout)
        with self._guard:
            skeleton = self.skeletons.get(key)
            if skeleton is None:
                skeleton = self.skeleton_factory(
                    spec.checkpoint_dir, spec.dtype, spec.engine, spec.layout
                )
                self.skeletons[key] = skeleton
            return skeleton

    def tokenizer_for(self, spec: ExpertSpec, skeleton: SharedSkeleton) -> Any:
        """The tokenizer of `spec`'s files, loaded once per skeleton: 150 experts made
        from one base model hold one tokenizer, not 150."""
        from transformers import AutoTokenizer

        key = (skeleton.key, tokenizer_key(spec.checkpoint_dir))
        with self._guard:
            tokenizer = self.tokenizers.get(key)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(spec.checkpoint_dir))
                self.tokenizers[key] = tokenizer
            return tokenizer

    def load(self, spec: ExpertSpec, index: TensorIndex) -> ExecutorExpert:
        """Make `spec` runnable: its engine (tokenizer, chat format) over the shared
        skeleton. No weights move here; they are bound per batch by `run`."""
        skeleton = self.skeleton_for(spec)
        skeleton.skeleton.check_index(index)  # wrong bytes for this architecture: fail now
        engine = self.engine_factory(
            spec.name,
            spec.engine,
            spec.checkpoint_dir,
            spec.dtype,
            spec.chat_format,
            skeleton.model,
            tokenizer=self.tokenizer_for(spec, skeleton),
        )
        weights = TieredWeights(spec.name, index, self.arena, skeleton, self.fetch)
        with self._guard:
            self.loads += 1
        return ExecutorExpert(spec, weights, ExpertServer(spec.name, engine, spec.system_prompt))

    def run(self, expert: ExecutorExpert, grant: Grant, jobs: Sequence[BatchJob]) -> bool:
        """Bind `expert` under `grant`, then answer `jobs`; True when it had to rebind.

        The caller holds `expert.skeleton.lock` for the whole call (and the grant).
        """
        rebound = expert.weights.bind(grant)
        self.rebinds += int(rebound)
        self.last_bound[expert.skeleton.key] = expert.weights
        expert.server.run_batch(jobs)
        return rebound

    def reports(self, in_use: set[str]) -> list[tuple[ResidencyReport, str]]:
        """(report, incarnation) for every region a skeleton is bound to now; `in_use`
        names the experts whose batch is running (their lease is still held)."""
        reports = []
        for weights in list(self.last_bound.values()):
            report = weights.report(weights.expert in in_use)
            bound = weights.bound
            if report is not None and bound is not None:
                reports.append((report, bound[0]))
        return reports
