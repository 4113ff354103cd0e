"""Turning a validated config into the plain objects the deployments run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from actors.weights.checkpoint import Progress, check_weights_complete, validate_checkpoint
from actors.weights.demo import build_source
from cluster.config import CoEConfig, ConfigError, ExpertSettings, resolve_path
from memory_tiers.packing import checkpoint_nbytes
from router.choose.mapping import CategoryMap
from router.choose.score_table import ScoreTable
from router.classify.classifier import OneCategoryClassifier, make_classifier
from router.classify.features import TextClassifier
from router.classify.loading import load_router_classifier
from router.classify.vote_classifier import NeighbourVoteClassifier
from router.embed.artifact_embedder import trained_embedder
from router.embed.embedder import LazyEmbedder
from router.embed.protocol import Embedder
from router.two_step import TwoStepRouter


def expert_checkpoint(expert: ExpertSettings, config: CoEConfig) -> Path:
    """Where an expert's weights are; demo sources resolve into the cache."""
    if expert.demo_source is not None:
        return config.resolved_cache_dir() / expert.demo_source
    assert expert.checkpoint is not None
    return resolve_path(expert.checkpoint)


def prepare_checkpoints(config: CoEConfig, progress: Progress) -> dict[str, Path]:
    """Build the demo weights the config needs (idempotent) and check every checkpoint.

    Runs before anything starts so a missing, truncated or corrupt checkpoint fails fast.
    """
    cache_dir = config.resolved_cache_dir()
    for source in sorted({e.demo_source for e in config.experts if e.demo_source}):
        build_source(cache_dir, source, progress)
    checkpoints = {}
    for expert in config.experts:
        directory = expert_checkpoint(expert, config)
        validate_checkpoint(directory)
        check_weights_complete(directory)  # a truncated copy fails here, not in a replica
        checkpoints[expert.name] = directory
    check_tier_budget(config, checkpoints)
    check_architectures(config, checkpoints)
    return checkpoints


def check_architectures(config: CoEConfig, checkpoints: dict[str, Path]) -> None:
    """Fail before anything starts when a tiered expert's model cannot be built as a
    skeleton: the tiers (and the executors) bind bytes into a model built from the
    checkpoint's config.json by transformers' causal-LM auto class."""
    if not config.tiers.enabled:
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for expert in config.experts:
        config_file = checkpoints[expert.name] / "config.json"
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"expert {expert.name!r}: cannot read {config_file}: {error}"
            ) from None
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ConfigError(
                f"expert {expert.name!r}: its architecture (model_type {model_type!r} in "
                f"{config_file}) is not a causal LM transformers can build, so no executor "
                "or tiered replica can run it"
            )


def check_tier_budget(config: CoEConfig, checkpoints: dict[str, Path]) -> None:
    """Fail before anything starts when an expert can never fit the device budget."""
    tiers = config.tiers
    if not tiers.enabled or tiers.hbm_budget_bytes is None:
        return
    sizes = {e.name: checkpoint_nbytes(checkpoints[e.name], e.dtype) for e in config.experts}
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
    """The configured two-step router: few-shot or trained classifier, hard or soft routing.

    A trained classifier learns each config category it does not know from that
    category's examples (`with_category`): the trained classes are not refitted.
    """
    settings = config.router
    embedder = embedder if embedder is not None else LazyEmbedder(settings.embedder)
    category_map = CategoryMap(
        experts_by_category=dict(config.category_map),
        generalist=config.generalist,
        experts=frozenset(e.name for e in config.experts),
    )
    table = score_table(config)
    classifier: Any
    if settings.classifier == "trained":
        classifier = trained_classifier(config, embedder)
    elif len(config.categories) == 1:
        # Nothing to tell apart: the embedder is not needed to fit or to route.
        classifier = OneCategoryClassifier(config.categories[0].name)
    else:
        texts = [text for c in config.categories for text in c.examples]
        labels = [c.name for c in config.categories for _ in c.examples]
        params: dict[str, Any] = {"temperature": settings.temperature}
        if settings.classifier == "knn":
            params["k"] = settings.knn_k
        classifier = make_classifier(settings.classifier, **params).fit(
            embedder.embed(texts), labels
        )
    return TwoStepRouter(
        embedder,
        classifier,
        category_map,
        settings.confidence_threshold,
        mode=settings.routing,
        score_table=table,
        cost_weight=settings.cost_weight,
    )


def trained_classifier(config: CoEConfig, embedder: Embedder) -> Any:
    """Load `router.artifact`, extended by the config's categories it does not know."""
    assert config.router.artifact is not None  # the schema requires it for 'trained'
    directory = resolve_path(config.router.artifact)
    try:
        classifier: Any = load_router_classifier(directory)
        trained_on = trained_embedder(directory)
    except (OSError, ValueError) as error:
        raise ConfigError(f"router.artifact {directory}: {error}") from None
    if trained_on is not None and trained_on != config.router.embedder:
        raise ConfigError(
            f"the classifier at {directory} was trained on embedder {trained_on!r}, but "
            f"router.embedder is {config.router.embedder!r}; set router.embedder: {trained_on}"
        )
    configured = {c.name: c for c in config.categories}
    unknown = sorted(set(classifier.categories) - set(configured))
    if unknown:
        raise ConfigError(
            f"the classifier at {directory} predicts categories the config does not list "
            f"(add them to categories and category_map): {unknown}"
        )
    for name, category in configured.items():
        if name in classifier.categories:
            continue
        if not category.examples:
            raise ConfigError(
                f"category {name!r} is new to the classifier at {directory}; give it examples"
            )
        examples = list(category.examples)
        vectors = embedder.embed(examples)
        if isinstance(classifier, (TextClassifier, NeighbourVoteClassifier)):  # reads the text
            classifier = classifier.with_category(name, examples, vectors)
        else:
            classifier = classifier.with_category(name, vectors)
    return classifier


def score_table(config: CoEConfig) -> ScoreTable | None:
    """`expert_scores` as a table (missing cells score 0), costs from `params_b`."""
    if not config.expert_scores:
        return None
    categories = [c.name for c in config.categories]
    experts = [e.name for e in config.experts]
    scores = np.zeros((len(categories), len(experts)))
    for row, category in enumerate(categories):
        for column, expert in enumerate(experts):
            scores[row, column] = config.expert_scores.get(category, {}).get(expert, 0.0)
    return ScoreTable(
        categories=tuple(categories),
        experts=tuple(experts),
        scores=scores,
        costs_b=np.array([e.params_b for e in config.experts]),
        frequencies=np.full(len(categories), 1.0 / len(categories)),
    )
