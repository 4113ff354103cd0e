"""Turning a validated config into the plain objects the deployments run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from actors.checkpoint import Progress, validate_checkpoint
from actors.demo import build_source
from cluster.config import CoEConfig, ConfigError, ExpertSettings, resolve_path
from router.embedder import Embedder, make_embedder
from router.mapping import CategoryMap
from router.two_step import TwoStepRouter, few_shot_router


def expert_checkpoint(expert: ExpertSettings, config: CoEConfig) -> Path:
    """Where an expert's weights are; demo sources resolve into the cache."""
    if expert.demo_source is not None:
        return config.resolved_cache_dir() / expert.demo_source
    assert expert.checkpoint is not None
    return resolve_path(expert.checkpoint)


def prepare_checkpoints(config: CoEConfig, progress: Progress) -> dict[str, Path]:
    """Build the demo weights the config needs (idempotent) and check every checkpoint.

    Runs before anything starts so a missing or broken checkpoint fails fast.
    """
    cache_dir = config.resolved_cache_dir()
    for source in sorted({e.demo_source for e in config.experts if e.demo_source}):
        build_source(cache_dir, source, progress)
    checkpoints = {}
    for expert in config.experts:
        directory = expert_checkpoint(expert, config)
        validate_checkpoint(directory)
        checkpoints[expert.name] = directory
    check_tier_budget(config, checkpoints)
    return checkpoints


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def weight_bytes(directory: Path, dtype: str) -> int:
    """Bytes of an expert's weights at `dtype`, from the safetensors headers alone."""
    elements = 0
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for size in entry["shape"]:
                    count *= int(size)
                elements += count
    return elements * DTYPE_BYTES[dtype]


def check_tier_budget(config: CoEConfig, checkpoints: dict[str, Path]) -> None:
    """Fail before anything starts when an expert can never fit the device budget."""
    tiers = config.tiers
    if not tiers.enabled or tiers.hbm_budget_bytes is None:
        return
    sizes = {e.name: weight_bytes(checkpoints[e.name], e.dtype) for e in config.experts}
    largest = max(sizes, key=lambda name: sizes[name])
    if sizes[largest] > tiers.hbm_budget_bytes:
        raise ConfigError(
            f"tiers.hbm_budget_bytes ({tiers.hbm_budget_bytes}) is smaller than expert "
            f"{largest!r} ({sizes[largest]} bytes of weights); raise the budget to at least that"
        )
    pinned = sum(sizes[name] for name in tiers.pinned)
    if pinned > tiers.hbm_budget_bytes:
        raise ConfigError(
            f"tiers.pinned experts {tiers.pinned} need {pinned} bytes, more than "
            f"tiers.hbm_budget_bytes ({tiers.hbm_budget_bytes})"
        )


def build_router(config: CoEConfig, embedder: Embedder | None = None) -> TwoStepRouter:
    settings = config.router
    category_map = CategoryMap(
        experts_by_category=dict(config.category_map),
        generalist=config.generalist,
        experts=frozenset(e.name for e in config.experts),
    )
    return few_shot_router(
        embedder or make_embedder(settings.embedder),
        {c.name: list(c.examples) for c in config.categories},
        category_map,
        settings.confidence_threshold,
        classifier=settings.classifier,
        temperature=settings.temperature,
        knn_k=settings.knn_k,
    )
