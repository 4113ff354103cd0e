"""How good is the routed CoE, measured on recorded MMLU-Pro correctness.

    .venv/bin/python -m benchmarks.coe_quality --train DIR --test DIR \
        --budget-b 35 --budget-b 50 --json OUT.json [--plot OUT.png]

Each DIR is a dataset directory (see router/mmlu_pro.py). Everything is learned from
--train: the classifier, its temperature, the score tables and every routing setting
(cost price, confidence threshold), the latter on cross-validated predictions over
--train (each train question predicted by a classifier that did not see it). Every
--test question is then routed once; routing a question to a model "answers" it with
that model's recorded result, so the routed accuracy is exact.

Routing modes (all reported under "modes"; --mode picks the one in "budgets"):
- hard: the paper's rule, map from true train categories, argmax category -> expert.
- hard-predicted: the map is chosen on cross-validated PREDICTED categories, so it
  absorbs the router's confusion (an often-confused category gets a safer expert).
- soft: argmax_e sum_c p(c|x) scores[c, e] - price * cost_e, the scores taken from
  cross-validated probabilities; the price is the smallest whose cost fits the budget.
Each mode may send prompts below a confidence threshold to the generalist (the best
single model); the threshold is chosen on the cross-validated predictions.

Budgets are met on validation with a margin of two standard errors of the mean cost
for a test set of this size, so the measured test average stays within the budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from router.classifier import make_classifier
from router.embedder import Embedder
from router.features import TextClassifier
from router.mmlu_pro import DatasetError, MMLUProData, load_dataset
from router.optimiser import ScoreTable, quality_frontier
from router.policy import HardRouting, SoftRouting, choose_experts, fit_cost_weight

MODES = ("hard", "hard-predicted", "soft")
THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class Settings:
    classifier: str = "text-logreg"
    folds: int = 5
    seed: int = 0
    mode: str = "soft"
    subcategories: bool = False  # learn category/source-family classes instead of categories
    margin_z: float = 2.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def class_label(category: str, src: str, subcategories: bool) -> str:
    if not subcategories:
        return category
    family = src.split("-")[0]
    return f"{category}/{'mmlu' if family == 'ori_mmlu' else family}"


def parent(label: str) -> str:
    return label.split("/")[0]


def fit_predict(
    settings: Settings,
    train_texts: list[str],
    train_vectors: np.ndarray,
    labels: list[str],
    texts: list[str],
    vectors: np.ndarray,
) -> tuple[list[str], np.ndarray]:
    """(classes, log-probabilities of `texts`) from a classifier fitted on the train rows."""
    if settings.classifier == TextClassifier.kind:
        text_model = TextClassifier(seed=settings.seed).fit(train_texts, train_vectors, labels)
        probabilities = text_model.predict_proba_texts(texts, vectors)
        classes = text_model.categories
    else:
        model = make_classifier(settings.classifier).fit(train_vectors, labels)
        probabilities, classes = model.predict_proba(vectors), model.categories
    return classes, np.log(np.clip(probabilities, 1e-12, None))


def power_softmax(log_probabilities: np.ndarray, temperature: float) -> np.ndarray:
    scaled = log_probabilities / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    weights = np.exp(scaled)
    return weights / weights.sum(axis=1, keepdims=True)


def fit_power_temperature(log_probabilities: np.ndarray, targets: np.ndarray) -> float:
    from scipy.optimize import minimize_scalar

    def loss(log_t: float) -> float:
        p = power_softmax(log_probabilities, float(np.exp(log_t)))
        return float(-np.log(np.clip(p[np.arange(len(targets)), targets], 1e-12, None)).mean())

    return float(np.exp(minimize_scalar(loss, bounds=(-5.0, 5.0), method="bounded").x))


def score_table(
    weights: np.ndarray, data: MMLUProData, classes: Sequence[str], experts: Sequence[str]
) -> ScoreTable:
    """Scores and frequencies from per-question class weights (one-hot or probabilities)."""
    columns = [data.experts.index(e) for e in experts]
    mass = weights.sum(axis=0)
    scores = (weights.T @ data.correctness[:, columns]) / np.maximum(mass, 1e-12)[:, None]
    costs = data.active_params_b[columns]
    return ScoreTable(tuple(classes), tuple(experts), scores, costs, mass / mass.sum())


def routed_outcome(data: MMLUProData, experts: Sequence[str]) -> tuple[float, float, float]:
    """(accuracy, mean active params, standard deviation of the active params) of a routing."""
    columns = np.array([data.experts.index(e) for e in experts])
    accuracy = float(data.correctness[np.arange(len(data)), columns].mean())
    costs = data.active_params_b[columns]
    return accuracy, float(costs.mean()), float(costs.std())


@dataclass(frozen=True)
class TunedRouting:
    routing: HardRouting | SoftRouting
    threshold: float
    validation_accuracy: float
    validation_cost_b: float
    validation_cost_std_b: float


def tune_mode(
    mode: str,
    budget_b: float,
    validation: MMLUProData,
    probabilities: np.ndarray,
    classes: list[str],
    tables: dict[str, ScoreTable],
    generalist: str,
) -> TunedRouting | None:
    """The best routing of `mode` on validation rows whose measured cost fits budget_b."""
    best: TunedRouting | None = None
    for threshold in THRESHOLDS:
        candidate = _tune_one(
            mode, budget_b, validation, probabilities, classes, tables, generalist, threshold
        )
        if candidate and (best is None or candidate.validation_accuracy > best.validation_accuracy):
            best = candidate
    return best


def _tune_one(
    mode: str,
    budget_b: float,
    validation: MMLUProData,
    probabilities: np.ndarray,
    classes: list[str],
    tables: dict[str, ScoreTable],
    generalist: str,
    threshold: float,
) -> TunedRouting | None:
    def measured(routing: HardRouting | SoftRouting) -> TunedRouting:
        experts, _ = choose_experts(probabilities, classes, routing)
        return TunedRouting(routing, threshold, *routed_outcome(validation, experts))

    if mode == "soft":
        table = tables["soft"]
        try:
            fitted = fit_cost_weight(
                probabilities,
                classes,
                table,
                budget_b,
                generalist,
                threshold,
                allowed_experts=_sized(table),
            )
        except ValueError:  # InfeasibleBudget included: the fallback alone costs too much
            return None
        return measured(fitted.routing)
    table = tables["true" if mode == "hard" else "soft"]
    fitting = None
    # The frontier is sorted by cost and its quality rises with cost: keep the last map
    # whose measured cost, fallbacks included, fits the budget.
    for choice in quality_frontier(table):
        result = measured(HardRouting(choice.assignment, generalist, threshold))
        if result.validation_cost_b <= budget_b:
            fitting = result
    return fitting


def _sized(table: ScoreTable) -> tuple[str, ...]:
    return tuple(e for e, c in zip(table.experts, table.costs_b, strict=True) if not np.isnan(c))


def check_compatible(train: MMLUProData, test: MMLUProData) -> None:
    if set(test.experts) != set(train.experts):
        raise DatasetError(
            f"train and test have different model columns: "
            f"{sorted(set(train.experts) ^ set(test.experts))}"
        )
    unknown = sorted(set(test.categories) - set(train.categories))
    if unknown:
        raise DatasetError(f"test has categories never seen in train: {unknown}")
    sized = [e for e, c in zip(train.experts, train.active_params_b, strict=True) if c == c]
    if not sized:
        raise DatasetError("no model has a known active-parameter size")


def run_benchmark(
    train: MMLUProData,
    test: MMLUProData,
    budgets: Sequence[float],
    embedder: Embedder,
    settings: Settings = Settings(),
    progress: Callable[[str], None] = log,
) -> dict[str, Any]:
    check_compatible(train, test)
    started = time.perf_counter()
    train_texts, test_texts = train.prompts(), test.prompts()
    progress(f"embedding {len(train_texts)} + {len(test_texts)} prompts")
    train_vectors, test_vectors = embedder.embed(train_texts), embedder.embed(test_texts)
    embed_s = time.perf_counter() - started
    labels = [class_label(q.category, q.src, settings.subcategories) for q in train.questions]
    classes = sorted(set(labels))
    targets = np.array([classes.index(label) for label in labels])
    # Cross-validated predictions: each train row predicted by a model that never saw it.
    folds = min(settings.folds, min(np.bincount(targets)))
    folds = max(folds, 2)
    out_of_fold = np.zeros((len(train), len(classes)))
    fold_of = np.zeros(len(train), dtype=np.int64)
    for index in range(len(classes)):  # stratified: every class spread over the folds
        rows = np.flatnonzero(targets == index)
        permuted = np.random.default_rng(settings.seed + index).permutation(rows)
        fold_of[permuted] = np.arange(len(rows)) % folds
    for fold in range(folds):
        held = np.flatnonzero(fold_of == fold)
        kept = np.flatnonzero(fold_of != fold)
        progress(f"cross-validation fold {fold + 1}/{folds}")
        fold_classes, logp = fit_predict(
            settings,
            [train_texts[i] for i in kept],
            train_vectors[kept],
            [labels[i] for i in kept],
            [train_texts[i] for i in held],
            train_vectors[held],
        )
        columns = np.array([classes.index(c) for c in fold_classes], dtype=np.int64)
        out_of_fold[held] = np.log(1e-12)
        out_of_fold[np.ix_(held, columns)] = logp
    temperature = fit_power_temperature(out_of_fold, targets)
    validation_p = power_softmax(out_of_fold, temperature)
    progress("fitting the final classifier on all of --train")
    _, test_logp = fit_predict(
        settings, train_texts, train_vectors, labels, test_texts, test_vectors
    )
    test_p = power_softmax(test_logp, temperature)
    classify_s = time.perf_counter() - started - embed_s

    sized = [e for e, c in zip(train.experts, train.active_params_b, strict=True) if c == c]
    train_accuracy = train.correctness.mean(axis=0)
    best_index = max((train.experts.index(e) for e in sized), key=lambda i: train_accuracy[i])
    best_single = train.experts[best_index]
    test_best = float(test.correctness[:, test.experts.index(best_single)].mean())
    best_cost = float(train.active_params_b[best_index])
    tables = {
        "true": score_table(np.eye(len(classes))[targets], train, classes, sized),
        "soft": score_table(validation_p, train, classes, sized),
    }
    true_test = np.array([parent(classes[i]) for i in test_p.argmax(axis=1)])
    router_accuracy = float(np.mean(true_test == np.array(test.categories)))

    modes: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    entries = []
    for budget in budgets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # closed models are excluded by name above
            for mode in MODES:
                # Two passes: the first measures how much routed costs vary per question,
                # the second aims below the budget by z standard errors of a test mean.
                first = tune_mode(mode, budget, train, validation_p, classes, tables, best_single)
                tuned, target = first, None
                if first is not None:
                    margin = settings.margin_z * first.validation_cost_std_b / np.sqrt(len(test))
                    target = budget - margin
                    tuned = tune_mode(
                        mode, target, train, validation_p, classes, tables, best_single
                    )
                modes[mode].append(_evaluate(budget, target, tuned, test, test_p, classes))
        entry = dict(next(m for m in modes[settings.mode] if m["budget_b"] == budget))
        entry["category_oracle_accuracy"] = _oracle_at(
            budget, tables["true"], test, settings, best_single
        )
        entries.append(entry)
        progress(f"budget {budget}B: {entry}")

    return {
        "router_accuracy": router_accuracy,
        "budgets": entries,
        "best_single_model": best_single,
        "best_single_accuracy": test_best,
        "best_single_active_params_b": best_cost,
        "category_oracle_accuracy": _oracle_at(None, tables["true"], test, settings, best_single),
        "question_oracle_accuracy": float(
            test.correctness[:, [test.experts.index(e) for e in sized]].max(axis=1).mean()
        ),
        "random_expert_accuracy": float(
            test.correctness[:, [test.experts.index(e) for e in sized]].mean()
        ),
        "mode": settings.mode,
        "modes": modes,
        "classifier": settings.classifier,
        "subcategories": settings.subcategories,
        "classes": len(classes),
        "temperature": temperature,
        "validation_router_accuracy": float(
            np.mean(
                [
                    parent(classes[i]) == parent(labels[r])
                    for r, i in enumerate(validation_p.argmax(axis=1))
                ]
            )
        ),
        "train_questions": len(train),
        "test_questions": len(test),
        "seconds": {
            "embed": embed_s,
            "classify": classify_s,
            "total": time.perf_counter() - started,
        },
    }


def _evaluate(
    budget: float,
    target: float | None,
    tuned: TunedRouting | None,
    test: MMLUProData,
    test_p: np.ndarray,
    classes: list[str],
) -> dict[str, Any]:
    if tuned is None:
        return {"budget_b": budget, "feasible": False}
    experts, fallback = choose_experts(test_p, classes, tuned.routing)
    accuracy, cost, _ = routed_outcome(test, experts)
    return {
        "budget_b": budget,
        "accuracy": accuracy,
        "avg_active_params_b": cost,
        "experts_used": sorted(set(experts)),
        "within_budget": cost <= budget,
        "fallback_rate": float(fallback.mean()),
        "confidence_threshold": tuned.threshold,
        "cost_target_b": None if target is None else float(target),
        "validation_accuracy": tuned.validation_accuracy,
        "validation_avg_active_params_b": tuned.validation_cost_b,
        **(
            {"cost_weight": tuned.routing.cost_weight}
            if isinstance(tuned.routing, SoftRouting)
            else {}
        ),
    }


def _oracle_at(
    budget: float | None,
    table: ScoreTable,
    test: MMLUProData,
    settings: Settings,
    generalist: str,
) -> float:
    """Accuracy with perfect (true) labels and the best map from train within the budget."""
    frontier = quality_frontier(table)
    fitting = [c for c in frontier if budget is None or c.avg_active_params_b <= budget]
    if not fitting:
        return float("nan")
    assignment = fitting[-1].assignment
    labels = [class_label(q.category, q.src, settings.subcategories) for q in test.questions]
    experts = [assignment.get(label, generalist) for label in labels]
    return routed_outcome(test, experts)[0]


def print_table(result: dict[str, Any]) -> None:
    print(f"router category accuracy   {result['router_accuracy']:.4f}")
    print(
        f"best single ({result['best_single_model']}, "
        f"{result['best_single_active_params_b']:g}B)  {result['best_single_accuracy']:.4f}"
    )
    print(f"category oracle            {result['category_oracle_accuracy']:.4f}")
    print(f"question oracle            {result['question_oracle_accuracy']:.4f}")
    print(f"random expert              {result['random_expert_accuracy']:.4f}")
    print(f"{'mode':16s} {'budget':>7s} {'accuracy':>9s} {'avg B':>7s} {'vs best':>8s} experts")
    for mode, entries in result["modes"].items():
        for entry in entries:
            if not entry.get("feasible", True):
                print(f"{mode:16s} {entry['budget_b']:7g}  infeasible")
                continue
            gain = 100 * (entry["accuracy"] - result["best_single_accuracy"])
            print(
                f"{mode:16s} {entry['budget_b']:7g} {entry['accuracy']:9.4f} "
                f"{entry['avg_active_params_b']:7.2f} {gain:+7.2f}p {len(entry['experts_used'])}"
            )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for marker, (mode, entries) in zip("os^", result["modes"].items(), strict=False):
        points = [(e["avg_active_params_b"], e["accuracy"]) for e in entries if "accuracy" in e]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker=marker, linestyle="-", label=f"routed: {mode}")
    axes.scatter(
        [result["best_single_active_params_b"]],
        [result["best_single_accuracy"]],
        color="black",
        marker="*",
        s=120,
        label=f"best single: {result['best_single_model']}",
    )
    axes.axhline(
        result["category_oracle_accuracy"],
        color="grey",
        linestyle=":",
        label="category oracle (no budget)",
    )
    for entry in result["budgets"]:
        axes.axvline(entry["budget_b"], color="red", alpha=0.3, linestyle="--")
    axes.set_xlabel("average active parameters per question (B)")
    axes.set_ylabel("accuracy on --test")
    axes.set_title(f"Routed CoE on MMLU-Pro (router accuracy {result['router_accuracy']:.3f})")
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.coe_quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--train", type=Path, required=True, help="dataset directory to learn from")
    parser.add_argument("--test", type=Path, required=True, help="dataset directory to route")
    parser.add_argument(
        "--budget-b",
        type=float,
        action="append",
        required=True,
        help="average active-parameter budget in billions (repeatable)",
    )
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--plot", type=Path, help="optional PNG of accuracy against cost")
    parser.add_argument(
        "--classifier",
        default=Settings.classifier,
        choices=[TextClassifier.kind, "logreg", "knn", "centroid"],
    )
    parser.add_argument(
        "--mode", default=Settings.mode, choices=MODES, help="routing mode reported under 'budgets'"
    )
    parser.add_argument(
        "--subcategories",
        action="store_true",
        help="learn category/source-family classes (finer map)",
    )
    parser.add_argument("--folds", type=int, default=Settings.folds)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument(
        "--cache-dir", type=Path, help="embedding cache (default $COE_CACHE_DIR or ~/.cache/coe)"
    )
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error(f"--folds must be >= 2, got {args.folds}")
    if any(b <= 0 for b in args.budget_b):
        parser.error(f"--budget-b must be > 0, got {args.budget_b}")
    try:
        train, test = load_dataset(args.train), load_dataset(args.test)
        check_compatible(train, test)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from router.embed_cache import CachedEmbedder
    from router.embedder import MiniLMEmbedder

    embedder = CachedEmbedder(MiniLMEmbedder(), args.cache_dir)
    settings = Settings(args.classifier, args.folds, args.seed, args.mode, args.subcategories)
    result = run_benchmark(train, test, args.budget_b, embedder, settings)
    result["embedding_cache"] = {"hits": embedder.hits, "misses": embedder.misses}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
