"""`coe router train|eval` and `coe map optimize|frontier`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cluster.config import load_config, resolve_path
from cluster.console import say as _say
from router.embed.artifact_embedder import save_embedder_name, trained_embedder
from router.embed.embedder import MiniLMEmbedder

MINILM = MiniLMEmbedder.name


class CommandInputError(ValueError):
    """A command argument that cannot be used: missing file, wrong columns, bad value."""


def _labelled(path: Path) -> Any:
    from router.training.classifier_fit import TrainingDataError, load_labelled_jsonl

    source = path / "questions.jsonl" if path.is_dir() else path
    try:
        return load_labelled_jsonl(source)
    except TrainingDataError as error:
        raise CommandInputError(str(error)) from None


def _embedder(name: str) -> Any:
    from router.embed.embed_cache import CachedEmbedder
    from router.embed.embedder import make_embedder

    try:
        embedder = make_embedder(name)
    except ValueError as error:
        raise CommandInputError(str(error)) from None
    # Embeddings are cached on disk by content hash: re-running on the same prompts is fast.
    return CachedEmbedder(embedder, progress=_say)


def _train(args: argparse.Namespace) -> int:
    from router.classify.features import TEXT_KIND, TextClassifier
    from router.classify.vote_classifier import NeighbourVoteClassifier
    from router.training.classifier_fit import train_classifier
    from router.training.vote_fit import fit_neighbour_vote_classifier

    data = _labelled(args.data)
    _say(f"{len(data)} labelled prompts in {len(data.categories)} categories from {args.data}")
    _say(f"embedding with {args.embedder} (cached by content hash)")
    vectors = _embedder(args.embedder).embed(data.texts)
    _say(f"training a {args.kind} classifier")
    classifier: Any
    if args.kind == TEXT_KIND:
        classifier = TextClassifier(seed=args.seed).fit(data.texts, vectors, data.labels)
    elif args.kind == NeighbourVoteClassifier.kind:
        try:
            classifier = fit_neighbour_vote_classifier(
                data.texts, vectors, data.labels, seed=args.seed, progress=_say
            )
        except ValueError as error:
            raise CommandInputError(f"{args.data}: {error}") from None
    else:
        classifier = train_classifier(args.kind, vectors, data.labels, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    classifier.save(args.out)
    save_embedder_name(args.out, args.embedder)
    _say(f"saved to {args.out}; set router.classifier: trained and router.artifact: {args.out}")
    return 0


def confusion(truth: list[str], predicted: list[str], categories: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(categories)}
    matrix = np.zeros((len(categories), len(categories)), dtype=np.int64)
    for actual, guess in zip(truth, predicted, strict=True):
        matrix[index[actual], index[guess]] += 1
    return matrix


def _eval(args: argparse.Namespace) -> int:
    from router.classify.features import TextClassifier
    from router.classify.loading import load_router_classifier
    from router.classify.vote_classifier import NeighbourVoteClassifier

    try:
        classifier = load_router_classifier(args.classifier)
    except (OSError, ValueError) as error:
        raise CommandInputError(f"cannot load classifier {args.classifier}: {error}") from None
    data = _labelled(args.data)
    unknown = sorted(set(data.labels) - set(classifier.categories))
    if unknown:
        raise CommandInputError(
            f"{args.data} has categories the classifier does not know: {unknown}"
        )
    vectors = _embedder(trained_embedder(args.classifier) or MINILM).embed(data.texts)
    if isinstance(classifier, (TextClassifier, NeighbourVoteClassifier)):
        probabilities = classifier.predict_proba_texts(data.texts, vectors)
    else:
        probabilities = classifier.predict_proba(vectors)
    categories = list(classifier.categories)
    predicted = [categories[i] for i in np.argmax(probabilities, axis=1)]
    matrix = confusion(data.labels, predicted, categories)
    accuracy = float(np.trace(matrix) / matrix.sum())
    print(f"accuracy {accuracy:.4f} on {len(data)} prompts")
    print(f"{'category':<20} {'n':>6} {'recall':>7}  most confused with")
    for row, category in enumerate(categories):
        total = int(matrix[row].sum())
        if not total:
            continue
        others = [(int(matrix[row, c]), categories[c]) for c in range(len(categories)) if c != row]
        count, worst = max(others) if others else (0, "-")
        print(f"{category:<20} {total:>6} {matrix[row, row] / total:>7.3f}  {worst} ({count})")
    if args.json:
        report = {
            "accuracy": accuracy,
            "categories": categories,
            "confusion": matrix.tolist(),
        }
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


def _table_from_data(directory: Path) -> Any:
    from router.choose.score_table import score_table_from_correctness
    from router.training.mmlu_pro import DatasetError, load_dataset

    try:
        data = load_dataset(directory)
    except DatasetError as error:
        raise CommandInputError(str(error)) from None
    return score_table_from_correctness(
        data.categories, data.correctness, data.experts, data.active_params_b.tolist()
    )


def _table_from_config(path: str) -> Any:
    from cluster.setup_steps import score_table

    table = score_table(load_config(path))
    if table is None:
        raise CommandInputError(f"{path} has no expert_scores to optimise over")
    return table


def _score_table(args: argparse.Namespace) -> Any:
    if (args.data is None) == (args.config is None):
        raise CommandInputError("give exactly one of --data DIR or --config FILE")
    return _table_from_data(args.data) if args.data is not None else _table_from_config(args.config)


def _print_choice(choice: Any) -> None:
    print(
        f"expected quality {choice.expected_quality:.4f} at "
        f"{choice.avg_active_params_b:.2f}B average active parameters"
    )
    for category, expert in sorted(choice.assignment.items()):
        print(f"  {category:<20} -> {expert}")


def _optimize(args: argparse.Namespace) -> int:
    from router.training.optimiser import optimise_map

    table = _score_table(args)
    try:
        choice = optimise_map(table, args.budget_b)
    except ValueError as error:  # InfeasibleBudget is one
        raise CommandInputError(str(error)) from None
    _print_choice(choice)
    if args.out is not None:
        _write_map(args, table, choice.assignment)
        _say(f"wrote {args.out}")
    return 0


def _write_map(args: argparse.Namespace, table: Any, assignment: dict[str, str]) -> None:
    """A config (from --config) or a config fragment (from --data) holding the new map."""
    scores = {
        category: {
            expert: round(float(table.scores[row, column]), 6)
            for column, expert in enumerate(table.experts)
        }
        for row, category in enumerate(table.categories)
    }
    if args.config is not None:
        data = yaml.safe_load(resolve_path(args.config).read_text(encoding="utf-8"))
        data["category_map"] = dict(sorted(assignment.items()))
    else:
        data = {"category_map": dict(sorted(assignment.items())), "expert_scores": scores}
    args.out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _frontier(args: argparse.Namespace) -> int:
    from router.training.optimiser import quality_frontier

    table = _score_table(args)
    frontier = quality_frontier(table)
    print(f"{'avg active B':>12} {'quality':>8} experts")
    for choice in frontier:
        print(
            f"{choice.avg_active_params_b:>12.2f} {choice.expected_quality:>8.4f} "
            f"{', '.join(choice.experts_used)}"
        )
    if args.json is not None:
        rows = [
            {
                "avg_active_params_b": c.avg_active_params_b,
                "expected_quality": c.expected_quality,
                "assignment": c.assignment,
            }
            for c in frontier
        ]
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    if args.png is not None:
        plot_frontier(frontier, args.png)
        _say(f"wrote {args.png}")
    return 0


def plot_frontier(frontier: list[Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.step(
        [c.avg_active_params_b for c in frontier],
        [c.expected_quality for c in frontier],
        where="post",
        marker=".",
    )
    axes.set_xlabel("average active parameters (B)")
    axes.set_ylabel("expected quality")
    axes.set_title("Category -> expert maps on the quality/cost frontier")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _existing_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return path


def add_router_commands(commands: Any) -> None:
    router = commands.add_parser("router", help="train and evaluate the category classifier")
    router_commands = router.add_subparsers(dest="router_command", required=True)
    train = router_commands.add_parser("train", help="train a classifier from labelled JSONL")
    train.add_argument(
        "--data",
        type=_existing_path,
        required=True,
        help="JSONL with prompt|question + category, or a dataset dir with questions.jsonl",
    )
    train.add_argument("--out", type=Path, required=True, help="directory to save it in")
    train.add_argument(
        "--kind",
        default="logreg",
        choices=("logreg", "knn", "centroid", "text-logreg", "text-logreg+votes"),
        help=(
            "classifier; text-logreg adds word n-grams to the embedding; text-logreg+votes "
            "mixes it with the categories of the nearest training prompts (the most "
            "accurate; fits the classifier once per cross-validation fold to weigh the votes)"
        ),
    )
    train.add_argument("--seed", type=int, default=0, help="calibration split seed")
    train.add_argument(
        "--embedder",
        default=MINILM,
        help="embedder to train on (router.embedder must then name the same one)",
    )
    train.set_defaults(run=_train)
    evaluate = router_commands.add_parser("eval", help="accuracy and per-category confusion")
    evaluate.add_argument("--classifier", type=_existing_path, required=True, help="saved dir")
    evaluate.add_argument("--data", type=_existing_path, required=True, help="labelled JSONL")
    evaluate.add_argument("--json", type=Path, default=None, help="also write a JSON report")
    evaluate.set_defaults(run=_eval)

    mapping = commands.add_parser("map", help="the category -> expert map under a budget")
    map_commands = mapping.add_subparsers(dest="map_command", required=True)
    for name, handler, text in (
        ("optimize", _optimize, "the best map within an average-active-parameter budget"),
        ("frontier", _frontier, "every map on the quality/cost frontier"),
    ):
        command = map_commands.add_parser(name, help=text)
        command.add_argument(
            "--data", type=_existing_path, default=None, help="dataset dir (MMLU-Pro format)"
        )
        command.add_argument("--config", default=None, help="config with expert_scores")
        command.set_defaults(run=handler)
        if name == "optimize":
            command.add_argument("--budget-b", type=float, required=True, help="billions")
            command.add_argument(
                "--out", type=Path, default=None, help="write the map into this YAML file"
            )
        else:
            command.add_argument("--png", type=Path, default=None, help="plot the frontier")
            command.add_argument("--json", type=Path, default=None, help="write the frontier")
