"""Route latency and throughput of the two-step router, next to the embedder alone.

    .venv/bin/python -m benchmarks.router_latency --json out/router_latency.json \\
        [--embedder NAME] [--classifier-kind text-logreg|logreg] [--classifier DIR] \\
        [--prompts FILE.jsonl ...] [--mode hard|soft]

Runs in-process and warm. Single-prompt latency: for a sample of real prompts drawn
evenly from every prompt file, `embedder.embed([p])` and `router.route(p)` (embed +
classify + map) are timed back to back, alternating which goes first. Throughput:
the same prompts go through `route_batch` and through `embed` alone in chunks of
--batch-size; the best of --repeats passes is kept for each.

Long prompts: the embedder truncates at its maximum sequence length (256 tokens for
MiniLM) but still tokenizes the whole text. For the batched runs the prompts are sorted
by length before chunking, so a few very long prompts (arena-hard has some of ~9,000
characters) share chunks with each other instead of padding every chunk; both the
router and the embedder-only baseline see the identical chunks. Per-file medians
are reported so the long-prompt sources are visible.

The classify + map step is also timed alone (the same router over vectors embedded
beforehand), which gives the router's own overhead free of the embedder's timing noise:
`router_own_overhead_pct`. On a busy machine, --threads 1 keeps torch from thrashing.

Without --classifier a classifier of --classifier-kind (default text-logreg, the
router's: TF-IDF n-grams + embedding) is trained on a stratified sample of the MMLU-Pro
questions (embeddings cached on disk by content hash). --embedder picks any name
`router.embed.embedder.make_embedder` knows (the full MiniLM, its truncated / int8 variants,
the static table distilled from it); the time to load or build it is reported too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from cluster.console import progress as say
from router.choose.mapping import CategoryMap
from router.choose.score_table import ScoreTable, score_table_from_correctness
from router.embed.embedder import MiniLMEmbedder
from router.embed.names import KNOWN_EMBEDDERS, is_known_embedder
from router.embed.protocol import Embedder
from router.jsonl import json_objects
from router.training.optimiser import optimise_map
from router.two_step import ROUTING_MODES, RoutingMode, TwoStepRouter

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
DEFAULT_PROMPTS_DIR = SHARED_DATA / "prompts"
DEFAULT_MMLU_PRO = SHARED_DATA / "mmlu_pro"
GENERALIST = "generalist"
DEFAULT_EMBEDDER = MiniLMEmbedder.name
CLASSIFIER_KINDS = ("text-logreg", "logreg")
# Soft mode's price per billion active parameters; its value does not change the timing.
SOFT_COST_WEIGHT = 0.001


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable, or has no `prompt`/`question` text."""


def load_prompt_file(path: Path) -> list[str]:
    """Every `prompt` (or else `question`) string of a JSONL file."""
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    prompts: list[str] = []
    for number, record in json_objects(path, PromptFileError):
        text = record.get("prompt", record.get("question"))
        if not isinstance(text, str) or not text.strip():
            raise PromptFileError(
                f"{path}:{number}: needs a non-empty 'prompt' or 'question' string"
            )
        prompts.append(text)
    if not prompts:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    return prompts


def default_prompt_files() -> list[Path]:
    files = sorted(DEFAULT_PROMPTS_DIR.glob("*.jsonl"))
    if not files:
        raise PromptFileError(f"no *.jsonl prompt files in {DEFAULT_PROMPTS_DIR}; pass --prompts")
    return files


def round_robin(per_file: dict[str, list[str]], limit: int, seed: int) -> list[tuple[str, str]]:
    """Up to `limit` (file, prompt) pairs, taking from each file in turn (shuffled, seeded)."""
    rng = np.random.default_rng(seed)
    queues = {
        name: [prompts[i] for i in rng.permutation(len(prompts))]
        for name, prompts in per_file.items()
    }
    chosen: list[tuple[str, str]] = []
    while len(chosen) < limit and any(queues.values()):
        for name, queue in queues.items():
            if queue and len(chosen) < limit:
                chosen.append((name, queue.pop()))
    return chosen


def train_default_classifier(
    embedder: Embedder, mmlu_pro: Path, per_category: int, seed: int, kind: str = "text-logreg"
) -> Any:
    """A `kind` classifier trained on a stratified sample of MMLU-Pro questions."""
    from router.classify.features import TextClassifier
    from router.embed.embed_cache import CachedEmbedder
    from router.training.classifier_fit import train_classifier
    from router.training.mmlu_pro import load_dataset

    data = load_dataset(mmlu_pro)
    labels = data.categories
    rng = np.random.default_rng(seed)
    rows: list[int] = []
    for category in sorted(set(labels)):
        members = [i for i, label in enumerate(labels) if label == category]
        rows.extend(rng.permutation(members)[:per_category].tolist())
    rows.sort()
    texts = data.prompts()
    say(f"training {kind} on {len(rows)} MMLU-Pro questions (embeddings cached on disk)")
    chosen = [texts[i] for i in rows]
    vectors = CachedEmbedder(embedder).embed(chosen)
    if kind == TextClassifier.kind:
        return TextClassifier(seed=seed).fit(chosen, vectors, [labels[i] for i in rows])
    return train_classifier(kind, vectors, [labels[i] for i in rows], seed=seed)


def mmlu_pro_table(mmlu_pro: Path) -> ScoreTable | None:
    if not (mmlu_pro / "correctness.csv").is_file():
        return None
    from router.training.mmlu_pro import load_dataset

    data = load_dataset(mmlu_pro)
    return score_table_from_correctness(
        data.categories, data.correctness, data.experts, data.active_params_b.tolist()
    )


def build_router(
    embedder: Embedder, classifier: Any, mode: str, table: ScoreTable | None, budget_b: float
) -> TwoStepRouter:
    """Hard mode maps with the optimiser's map when the table covers the categories."""
    categories = list(classifier.categories)
    covered = table is not None and all(c in table.categories for c in categories)
    if mode == "soft" and not covered:
        raise ValueError(
            f"soft mode needs MMLU-Pro scores for every classifier category {categories}"
        )
    if covered and table is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # closed models are left out, as intended
            assignment = optimise_map(table, budget_b).assignment
        experts = frozenset({*table.experts, GENERALIST})
        mapped = {c: assignment[c] for c in categories}
        category_map = CategoryMap(mapped, GENERALIST, experts)
        return TwoStepRouter(
            embedder,
            classifier,
            category_map,
            0.0,
            mode=cast(RoutingMode, mode),
            score_table=table,
            cost_weight=SOFT_COST_WEIGHT,
        )
    category_map = CategoryMap({c: f"expert-{c}" for c in categories}, GENERALIST)
    return TwoStepRouter(embedder, classifier, category_map, 0.0)


def percentile(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def time_single(
    sample: list[tuple[str, str]],
    embed_one: Callable[[str], object],
    route_one: Callable[[str], object],
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-file lists of (embed, route) latencies in ms, alternating which runs first."""
    embed_ms: dict[str, list[float]] = {}
    route_ms: dict[str, list[float]] = {}
    for index, (name, prompt) in enumerate(sample):
        pair = [(embed_one, embed_ms), (route_one, route_ms)]
        for call, store in pair if index % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            call(prompt)
            store.setdefault(name, []).append((time.perf_counter() - start) * 1000)
    return embed_ms, route_ms


def time_batches(
    prompts: list[str],
    batch_size: int,
    repeats: int,
    calls: dict[str, Callable[[list[str]], object]],
) -> dict[str, float]:
    """Best prompts/s of each call over `repeats` passes of length-sorted chunks.

    The calls take turns within each repeat, so a noisy neighbour slows them alike.
    """
    ordered = sorted(prompts, key=len)
    chunks = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    best = dict.fromkeys(calls, 0.0)
    for repeat in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            for chunk in chunks:
                call(chunk)
            rate = len(prompts) / (time.perf_counter() - start)
            say(f"  pass {repeat + 1}/{repeats} {name}: {rate:.1f} prompts/s")
            best[name] = max(best[name], rate)
    return best


class PrecomputedEmbedder:
    """Answers with vectors embedded beforehand, so only classify + map is left to time."""

    def __init__(self, texts: list[str], embedder: Embedder) -> None:
        unique = sorted(set(texts))
        self.dimension = embedder.dimension
        self.vectors = dict(zip(unique, embedder.embed(unique), strict=True))

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])


def classify_and_map_cost(
    router: TwoStepRouter,
    embedder: Embedder,
    sample: list[tuple[str, str]],
    batch: list[str],
    batch_size: int,
    repeats: int,
) -> dict[str, float]:
    """The router's own work per prompt: the same router over precomputed vectors."""
    texts = [p for _name, p in sample] + batch
    say(f"embedding {len(set(texts))} prompts once to time classify + map alone")
    own = copy.copy(router)
    own.embedder = PrecomputedEmbedder(texts, embedder)
    single_ms, classify_ms = [], []
    for _name, prompt in sample:
        start = time.perf_counter()
        own.route(prompt)
        middle = time.perf_counter()
        own.probabilities([prompt])  # the classifier alone: lookup + features + logits
        classify_ms.append((time.perf_counter() - middle) * 1000)
        single_ms.append((middle - start) * 1000)
    rate = time_batches(batch, batch_size, repeats, {"classify+map": own.route_batch})
    return {
        "p50_ms": percentile(single_ms, 50),
        "classify_p50_ms": percentile(classify_ms, 50),
        "prompts_per_s": rate["classify+map"],
    }


def run(
    router: TwoStepRouter,
    embedder: Embedder,
    per_file: dict[str, list[str]],
    single: int,
    batch_limit: int,
    batch_size: int,
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    warm = [p for _name, p in round_robin(per_file, 32, seed + 1)]
    router.route_batch(warm)
    embedder.embed(warm)
    for prompt in warm[:8]:
        router.route(prompt)
    sample = round_robin(per_file, single, seed)
    say(f"timing {len(sample)} single prompts (embedder alone and full route)")
    embed_ms, route_ms = time_single(sample, lambda p: embedder.embed([p]), router.route)
    say(f"  single p50: embed {percentile([v for x in embed_ms.values() for v in x], 50):.2f} ms")
    batch = [p for _name, p in round_robin(per_file, batch_limit, seed + 2)]
    say(f"timing {len(batch)} prompts in batches of {batch_size}, best of {repeats}")
    rates = time_batches(
        batch, batch_size, repeats, {"embed": embedder.embed, "route": router.route_batch}
    )
    embed_rate, route_rate = rates["embed"], rates["route"]
    own = classify_and_map_cost(router, embedder, sample, batch, batch_size, repeats)
    all_embed = [v for values in embed_ms.values() for v in values]
    all_route = [v for values in route_ms.values() for v in values]
    route_p50, embed_p50 = percentile(all_route, 50), percentile(all_embed, 50)
    return {
        "route_p50_ms": round(route_p50, 3),
        "route_p99_ms": round(percentile(all_route, 99), 3),
        "route_batch_prompts_per_s": round(route_rate, 1),
        "embed_p50_ms": round(embed_p50, 3),
        "embed_p99_ms": round(percentile(all_embed, 99), 3),
        "embed_batch_prompts_per_s": round(embed_rate, 1),
        "router_overhead_pct": round(100 * (route_p50 / embed_p50 - 1), 2),
        "router_batch_overhead_pct": round(100 * (embed_rate / route_rate - 1), 2),
        "classify_map_p50_ms": round(own["p50_ms"], 4),
        "classify_p50_ms": round(own["classify_p50_ms"], 4),
        "classify_map_batch_prompts_per_s": round(own["prompts_per_s"], 1),
        # Classify + map alone against the embedder: immune to noise in the embedder timings.
        "router_own_overhead_pct": round(100 * own["p50_ms"] / embed_p50, 2),
        "router_own_batch_overhead_pct": round(100 * embed_rate / own["prompts_per_s"], 2),
        "per_file": {
            name: {
                "single_prompts": len(route_ms.get(name, [])),
                "median_chars": int(statistics.median(len(p) for p in per_file[name])),
                "route_p50_ms": round(percentile(route_ms[name], 50), 3),
                "embed_p50_ms": round(percentile(embed_ms[name], 50), 3),
            }
            for name in per_file
            if name in route_ms
        },
    }


def print_table(results: dict[str, Any], mode: str) -> None:
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}{'batched prompts/s':>20}")
    for label, prefix in (("embedder alone", "embed"), (f"route ({mode})", "route")):
        p50, p99 = results[f"{prefix}_p50_ms"], results[f"{prefix}_p99_ms"]
        rate = results[f"{prefix}_batch_prompts_per_s"]
        print(f"{label:24}{p50:>10.2f}{p99:>10.2f}{rate:>20.1f}")
    single, batched = results["router_overhead_pct"], results["router_batch_overhead_pct"]
    print(
        f"router overhead over the embedder: {single:+.1f}% single (p50), {batched:+.1f}% batched"
    )
    own, own_batched = results["router_own_overhead_pct"], results["router_own_batch_overhead_pct"]
    print(
        f"classify + map alone: {results['classify_map_p50_ms']:.3f} ms p50 "
        f"(classifier {results['classify_p50_ms']:.3f} ms) = {own:.2f}% of the "
        f"embedder single, {own_batched:.2f}% batched"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.router_latency",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument(
        "--prompts",
        type=Path,
        nargs="+",
        help="JSONL files with a prompt or question field (default: all of ../shared/data/prompts)",
    )
    parser.add_argument(
        "--embedder",
        default=DEFAULT_EMBEDDER,
        help=f"embedder name (default {DEFAULT_EMBEDDER}; known: {', '.join(KNOWN_EMBEDDERS)}, "
        "or any all-MiniLM-L6-v2[-int8][-seqN])",
    )
    parser.add_argument(
        "--classifier",
        type=Path,
        help="a saved classifier directory (default: train --classifier-kind on MMLU-Pro)",
    )
    parser.add_argument(
        "--classifier-kind",
        choices=CLASSIFIER_KINDS,
        default=CLASSIFIER_KINDS[0],
        help="kind trained when no --classifier is given",
    )
    parser.add_argument("--mode", choices=ROUTING_MODES, default="hard", help="second routing step")
    parser.add_argument(
        "--mmlu-pro", type=Path, default=DEFAULT_MMLU_PRO, help="MMLU-Pro data directory"
    )
    parser.add_argument(
        "--train-per-category",
        type=int,
        default=100,
        help="MMLU-Pro questions per category for the default classifier",
    )
    parser.add_argument("--budget-b", type=float, default=35.0, help="budget of the hard map")
    parser.add_argument("--single", type=int, default=300, help="prompts timed one at a time")
    parser.add_argument(
        "--batch-prompts", type=int, default=1500, help="prompts in the batched runs"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per route_batch call")
    parser.add_argument("--repeats", type=int, default=3, help="batched passes (best kept)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's own choice); 1 avoids thrashing on a "
        "busy machine",
    )
    parser.add_argument(
        "--max-seq-length",
        type=int,
        help="tokens the embedder reads per prompt (default: the model's own, 256 for MiniLM); "
        "applies to the router and the embedder baseline alike",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("single", "batch_prompts", "batch_size", "repeats", "train_per_category"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.max_seq_length is not None and args.max_seq_length < 8:
        parser.error(f"--max-seq-length must be >= 8, got {args.max_seq_length}")
    if not is_known_embedder(args.embedder):
        parser.error(f"unknown --embedder {args.embedder!r}; known: {', '.join(KNOWN_EMBEDDERS)}")
    if args.budget_b < 0:
        parser.error(f"--budget-b must be >= 0, got {args.budget_b}")
    try:
        files = args.prompts or default_prompt_files()
        args.per_file = {path.name: load_prompt_file(path) for path in files}
    except PromptFileError as error:
        parser.error(str(error))
    if args.classifier is not None and not args.classifier.is_dir():
        parser.error(f"classifier directory {args.classifier} does not exist")
    return args


def main(argv: list[str] | None = None, embedder: Embedder | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_s = None
    if embedder is None:
        from router.embed.embedder import make_embedder

        say(f"loading the {args.embedder} embedder")
        started = time.perf_counter()
        embedder = make_embedder(args.embedder)
        load_s = round(time.perf_counter() - started, 2)
    model = getattr(embedder, "model", None)
    if args.max_seq_length is not None:
        if model is None or not hasattr(model, "max_seq_length"):
            raise ValueError(
                "--max-seq-length needs an embedder with a sentence-transformers model"
            )
        model.max_seq_length = args.max_seq_length
    if args.classifier is not None:
        from router.classify.loading import load_router_classifier

        # Any kind `coe router train` saves.
        classifier: Any = load_router_classifier(args.classifier)
    else:
        classifier = train_default_classifier(
            embedder, args.mmlu_pro, args.train_per_category, args.seed, args.classifier_kind
        )
    router = build_router(
        embedder, classifier, args.mode, mmlu_pro_table(args.mmlu_pro), args.budget_b
    )
    results = run(
        router,
        embedder,
        args.per_file,
        args.single,
        args.batch_prompts,
        args.batch_size,
        args.repeats,
        args.seed,
    )
    results["settings"] = {
        "mode": args.mode,
        "classifier": getattr(classifier, "kind", type(classifier).__name__),
        "categories": len(classifier.categories),
        "prompt_files": sorted(args.per_file),
        "single_prompts": args.single,
        "batch_prompts": min(args.batch_prompts, sum(len(p) for p in args.per_file.values())),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "batches_sorted_by_length": True,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "max_seq_length": getattr(model, "max_seq_length", None),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "embedder": getattr(embedder, "name", type(embedder).__name__),
        # Loading (or, the first time, distilling) the embedder, in this run.
        "embedder_load_s": load_s,
        "embedder_build_s": getattr(embedder, "metadata", {}).get("build_seconds"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, args.mode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
