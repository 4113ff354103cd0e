"""How good is the routed CoE, measured on recorded MMLU-Pro correctness.

    .venv/bin/python -m benchmarks.coe_quality --train DIR --test DIR \
        --budget-b 35 --budget-b 50 --json OUT.json [--plot OUT.png]

Each DIR is a dataset directory (see router/training/mmlu_pro.py). Everything is learned from
--train: the classifier, its temperature, the neighbour-vote mixture, the score tables
and every routing setting (cost price, confidence threshold), the latter on
cross-validated predictions over --train (each train question predicted by a
classifier that did not see it). Every --test question is then routed once; routing a
question to a model "answers" it with that model's recorded result, so the routed
accuracy is exact.

Routing modes (all reported under "modes"; --mode picks the one in "budgets"):
- hard: the paper's rule, map from true train categories, argmax category -> expert.
- hard-predicted: the map is chosen on cross-validated PREDICTED categories, so it
  absorbs the router's confusion (an often-confused category gets a safer expert).
- soft: argmax_e sum_c p(c|x) scores[c, e] - price * cost_e, the scores taken from
  cross-validated probabilities; the price is the smallest whose cost fits the budget.
- soft-knn (default, the best of these in cross-validation on train): soft routing on
  sharper category probabilities, the classifier's mixed with the votes of the nearest
  training prompts by embedding and by TF-IDF (router/classify/neighbour_votes.py; weights
  chosen by cross-validated log loss). Its price and threshold are chosen on
  cross-fitted rows: each fold routed with scores from the other folds only.
Each mode may send prompts below a confidence threshold to the generalist (the best
single model); the threshold is chosen on the cross-validated predictions.

Budgets are met on validation with a margin of two standard errors of the mean cost
for a test set of this size, so the measured test average stays within the budget.
The cross-validated classifier predictions are cached under --cache-dir, keyed by a
hash of the texts, vectors and settings, so a rerun on the same split skips them.
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

from router.classify.calibration import power_softmax
from router.classify.features import TextClassifier
from router.classify.neighbour_votes import NEIGHBOUR_KS, VoteMixture
from router.embed.protocol import Embedder
from router.training.budget_tuning import (
    TunedRouting,
    oracle_accuracy,
    report_on_test,
    score_table,
    tune_cross_fitted_soft,
    tune_mode,
)
from router.training.category_evidence import (
    class_label,
    class_predictions,
    neighbour_indexes,
    parent,
)
from router.training.mmlu_pro import DatasetError, MMLUProData, load_dataset
from router.training.temperature_fit import fit_power_temperature
from router.training.vote_fit import fit_vote_mixture

MODES = ("hard", "hard-predicted", "soft", "soft-knn")
CLASSIFIER, MIXED = "classifier", "classifier+knn"
# Which category probabilities each mode routes on.
PROBABILITIES_OF = {"hard": CLASSIFIER, "hard-predicted": CLASSIFIER, "soft": CLASSIFIER}
PROBABILITIES_OF["soft-knn"] = MIXED


@dataclass(frozen=True)
class Settings:
    classifier: str = "text-logreg"
    folds: int = 5
    seed: int = 0
    mode: str = "soft-knn"
    subcategories: bool = False  # learn category/source-family classes instead of categories
    margin_z: float = 2.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    check_compatible(train, test)
    if settings.mode not in MODES:
        raise ValueError(f"unknown mode {settings.mode!r}; choose one of {list(MODES)}")
    started = time.perf_counter()
    train_texts, test_texts = train.prompts(), test.prompts()
    progress(f"embedding {len(train_texts)} + {len(test_texts)} prompts")
    train_vectors, test_vectors = embedder.embed(train_texts), embedder.embed(test_texts)
    embed_s = time.perf_counter() - started
    labels = [class_label(q.category, q.src, settings.subcategories) for q in train.questions]
    test_labels = [class_label(q.category, q.src, settings.subcategories) for q in test.questions]
    predictions, cached = class_predictions(
        settings.classifier,
        settings.folds,
        settings.seed,
        train_texts,
        train_vectors,
        labels,
        test_texts,
        test_vectors,
        cache_dir,
        progress,
    )
    classes, fold_of = predictions.classes, predictions.fold_of
    targets = np.array([classes.index(label) for label in labels])
    temperature = fit_power_temperature(predictions.validation_log_p, targets)
    classify_s = time.perf_counter() - started - embed_s

    progress("nearest-neighbour votes and their mixture with the classifier")
    train_indexes, test_indexes = neighbour_indexes(
        train_texts, train_vectors, test_texts, test_vectors
    )
    mixture = fit_vote_mixture(
        predictions.validation_log_p, train_indexes, targets, ks=NEIGHBOUR_KS
    )
    probabilities = {
        CLASSIFIER: (
            power_softmax(predictions.validation_log_p, temperature),
            power_softmax(predictions.test_log_p, temperature),
        ),
        MIXED: (
            mixture.probabilities(predictions.validation_log_p, train_indexes, targets),
            mixture.probabilities(predictions.test_log_p, test_indexes, targets),
        ),
    }
    neighbours_s = time.perf_counter() - started - embed_s - classify_s

    sized = [e for e, c in zip(train.experts, train.active_params_b, strict=True) if c == c]
    train_accuracy = train.correctness.mean(axis=0)
    best_index = max((train.experts.index(e) for e in sized), key=lambda i: train_accuracy[i])
    best_single = train.experts[best_index]
    test_best = float(test.correctness[:, test.experts.index(best_single)].mean())
    best_cost = float(train.active_params_b[best_index])
    tables = {
        "true": score_table(np.eye(len(classes))[targets], train, classes, sized),
        "soft": score_table(probabilities[CLASSIFIER][0], train, classes, sized),
        "soft-knn": score_table(probabilities[MIXED][0], train, classes, sized),
    }

    def tuned_at(mode: str, budget_b: float) -> TunedRouting | None:
        validation_p = probabilities[PROBABILITIES_OF[mode]][0]
        if mode == "soft-knn":
            return tune_cross_fitted_soft(
                budget_b, train, validation_p, classes, tables[mode], fold_of, best_single
            )
        return tune_mode(mode, budget_b, train, validation_p, classes, tables, best_single)

    modes: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    entries = []
    for budget in budgets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # closed models are excluded by name above
            for mode in MODES:
                # Two passes: the first measures how much routed costs vary per question,
                # the second aims below the budget by z standard errors of a test mean.
                first = tuned_at(mode, budget)
                tuned, target = first, None
                if first is not None:
                    margin = settings.margin_z * first.validation_cost_std_b / np.sqrt(len(test))
                    target = budget - margin
                    tuned = tuned_at(mode, target)
                test_p = probabilities[PROBABILITIES_OF[mode]][1]
                modes[mode].append(report_on_test(budget, target, tuned, test, test_p, classes))
        entry = dict(next(m for m in modes[settings.mode] if m["budget_b"] == budget))
        entry["category_oracle_accuracy"] = oracle_accuracy(
            budget, tables["true"], test, test_labels, best_single
        )
        entries.append(entry)
        progress(f"budget {budget}B: {entry}")

    def category_accuracy(p: np.ndarray, truth: Sequence[str]) -> float:
        return float(
            np.mean(
                [
                    parent(classes[i]) == parent(t)
                    for i, t in zip(p.argmax(axis=1), truth, strict=True)
                ]
            )
        )

    test_truth, train_truth = test.categories, [parent(label) for label in labels]
    reported = PROBABILITIES_OF[settings.mode]
    return {
        "router_accuracy": category_accuracy(probabilities[reported][1], test_truth),
        "budgets": entries,
        "best_single_model": best_single,
        "best_single_accuracy": test_best,
        "best_single_active_params_b": best_cost,
        "category_oracle_accuracy": oracle_accuracy(
            None, tables["true"], test, test_labels, best_single
        ),
        "question_oracle_accuracy": float(
            test.correctness[:, [test.experts.index(e) for e in sized]].max(axis=1).mean()
        ),
        "random_expert_accuracy": float(
            test.correctness[:, [test.experts.index(e) for e in sized]].mean()
        ),
        "mode": settings.mode,
        "modes": modes,
        "router_probabilities": reported,
        "router_accuracy_by_probabilities": {
            name: category_accuracy(pair[1], test_truth) for name, pair in probabilities.items()
        },
        "validation_router_accuracy_by_probabilities": {
            name: category_accuracy(pair[0], train_truth) for name, pair in probabilities.items()
        },
        "classifier": settings.classifier,
        "subcategories": settings.subcategories,
        "classes": len(classes),
        "temperature": temperature,
        "neighbour_mixture": _mixture_json(mixture),
        "validation_router_accuracy": category_accuracy(probabilities[reported][0], train_truth),
        "train_questions": len(train),
        "test_questions": len(test),
        "folds": len(np.unique(fold_of)),
        "class_predictions_cached": cached,
        "seconds": {
            "embed": embed_s,
            "classify": classify_s,
            "neighbours": neighbours_s,
            "total": time.perf_counter() - started,
        },
    }


def _mixture_json(mixture: VoteMixture) -> dict[str, Any]:
    return {
        "classifier_weight": mixture.classifier_weight,
        "embedding_vote_weight": mixture.vote_weights[0],
        "tfidf_vote_weight": mixture.vote_weights[1],
        "k": mixture.k,
        "sharpness": mixture.sharpness,
        "temperature": mixture.temperature,
    }


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
    for marker, (mode, entries) in zip("os^Dv", result["modes"].items(), strict=False):
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
        "--cache-dir",
        type=Path,
        help="cache of embeddings and class predictions (default $COE_CACHE_DIR or ~/.cache/coe)",
    )
    parser.add_argument(
        "--no-prediction-cache",
        action="store_true",
        help="always refit the cross-validated classifiers (embeddings stay cached)",
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
    from router.embed.embed_cache import CachedEmbedder, default_cache_dir
    from router.embed.embedder import MiniLMEmbedder

    embedder = CachedEmbedder(MiniLMEmbedder(), args.cache_dir, progress=log)
    settings = Settings(args.classifier, args.folds, args.seed, args.mode, args.subcategories)
    cache_dir = None if args.no_prediction_cache else (args.cache_dir or default_cache_dir())
    result = run_benchmark(train, test, args.budget_b, embedder, settings, cache_dir=cache_dir)
    result["embedding_cache"] = {"hits": embedder.hits, "misses": embedder.misses}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
