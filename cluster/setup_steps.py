"""Turning a validated config into the plain objects the deployments run."""

from __future__ import annotations

from pathlib import Path

from actors.checkpoint import Progress, validate_checkpoint
from actors.demo import build_source
from cluster.config import CoEConfig, ExpertSettings, resolve_path
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
    return checkpoints


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
