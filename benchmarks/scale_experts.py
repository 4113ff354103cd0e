"""The scale benchmark's experts and their fully resident reference answers.

Every expert has weights of its own. The device arena is sized for a few synthetic
experts (`hbm_experts` and a half). The demo's real checkpoints (SmolLM2-135M-Instruct,
then Gemma-3-270M) are the most popular experts where they fit that arena, up to `real`
of them; every other expert is a small Llama with random weights from
`actors/weights/synthetic.py`, seeded by its rank and built once into the coe cache
(`<cache>/scale-experts/tiny-<seed>`), with the demo SmolLM2's tokenizer. A real
checkpoint larger than the arena is left out (and named in the results): with it
resident the arena would hold no other expert.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from actors.engines.base import ChatMessage, GenerationRequest
from actors.weights.synthetic import build_tiny_expert
from benchmarks.systems import chat_format_of, demo_checkpoints, system_prompt
from cluster.config import PROJECT_ROOT, load_config
from cluster.console import Say
from memory_tiers.packing import checkpoint_nbytes

SCALE_DIR = "scale-experts"


def cache_dir() -> Path:
    """Where `coe demo build` puts checkpoints ($COE_CACHE_DIR, then ~/.cache/coe)."""
    return load_config(PROJECT_ROOT / "configs" / "demo.yaml").resolved_cache_dir()


def real_checkpoints(say: Say) -> list[Path]:
    """The demo's distinct real checkpoints, SmolLM2 first (built on first use)."""
    distinct: list[Path] = []
    for path in demo_checkpoints(say).values():
        if path not in distinct:
            distinct.append(path)
    return distinct


@dataclass(frozen=True)
class ExpertSet:
    """Checkpoints in rank order, the arena they share, and which real ones were used."""

    dirs: tuple[Path, ...]
    arena_bytes: int
    real: tuple[Path, ...]  # the first len(real) ranks
    too_large: tuple[Path, ...]  # real checkpoints left out: larger than the arena

    def describe(self) -> dict[str, object]:
        return {
            "arena_bytes": self.arena_bytes,
            "real": [str(path) for path in self.real],
            "real_left_out": {
                str(path): f"{checkpoint_nbytes(path, 'float32')} bytes, larger than the arena"
                for path in self.too_large
            },
        }


def build_experts(experts: int, real: int, hbm_experts: int, say: Say) -> ExpertSet:
    """`experts` checkpoints in rank order: real ones first where they fit the arena,
    then synthetic ones seeded by rank (the first N of a larger set are the same)."""
    if real < 0:
        raise ValueError(f"real experts must be >= 0, got {real}")
    reals = real_checkpoints(say)
    root = cache_dir() / SCALE_DIR
    missing = [rank for rank in range(1, experts + 1) if not _built(root, rank)]
    if missing:
        say(f"building up to {len(missing)} synthetic experts into {root} (once)")
    # Every synthetic expert has the same shape: the last rank is always one of them.
    synthetic = build_tiny_expert(root / f"tiny-{experts}", experts, reals[0])
    arena = int(checkpoint_nbytes(synthetic, "float32") * (hbm_experts + 0.5))
    wanted = reals[: min(real, experts - 1)]
    used = tuple(p for p in wanted if checkpoint_nbytes(p, "float32") <= arena)
    dirs = list(used)
    for rank in range(len(dirs) + 1, experts + 1):
        dirs.append(build_tiny_expert(root / f"tiny-{rank}", rank, reals[0]))
    too_large = tuple(p for p in wanted if p not in used)
    return ExpertSet(tuple(dirs), arena, used, too_large)


def _built(root: Path, seed: int) -> bool:
    return (root / f"tiny-{seed}" / "model.safetensors").is_file()


@dataclass(frozen=True)
class ReferenceCheck:
    """One request's answer against its expert's fully resident answer."""

    index: int
    expert: str
    answer: str | None  # None: the request failed, nothing to compare
    reference: str

    @property
    def matches(self) -> bool:
        return self.answer == self.reference

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "expert": self.expert,
            "matches": self.matches,
            "answer": self.answer,
            "reference": self.reference,
        }


def reference_answers(
    wanted: Iterable[tuple[str, int, str]],
    checkpoints: dict[str, Path],
    max_tokens: int,
    say: Say,
) -> dict[tuple[str, str], str]:
    """Greedy answers of each (expert, rank, prompt) from the expert loaded whole with
    plain transformers in this process, with the system prompt the cluster gives it."""
    from actors.engines.transformers_engine import TransformersEngine
    from actors.expert_server import ExpertServer

    by_expert: dict[str, tuple[int, set[str]]] = {}
    for expert, rank, prompt in wanted:
        by_expert.setdefault(expert, (rank, set()))[1].add(prompt)
    answers: dict[tuple[str, str], str] = {}
    say(f"reference answers: {len(by_expert)} experts loaded whole with transformers")
    for expert, (rank, prompts) in sorted(by_expert.items()):
        path = checkpoints[expert]
        engine = TransformersEngine(expert, path, "float32", chat_format_of(path))
        server = ExpertServer(expert, engine, system_prompt(rank))
        for prompt in sorted(prompts):
            request = GenerationRequest(
                messages=(ChatMessage(role="user", content=prompt),), max_tokens=max_tokens
            )
            answers[(expert, prompt)] = server.generate(request).text
        del server, engine
    return answers


# Tokens a system prompt and the chat template add around a user prompt, at most.
TEMPLATE_TOKENS = 64


def prompts_that_fit(prompts: list[str], checkpoints: Iterable[Path], max_tokens: int) -> list[str]:
    """The prompts every one of `checkpoints` can answer within its context window.

    A prompt past an expert's window is refused (a 400) by every system alike, so it
    would measure that refusal, not the system.
    """
    from transformers import AutoConfig, AutoTokenizer

    fitting = list(prompts)
    for checkpoint in sorted(set(checkpoints)):
        window = getattr(
            AutoConfig.from_pretrained(str(checkpoint)), "max_position_embeddings", None
        )
        if not isinstance(window, int):
            continue
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        room = window - max_tokens - TEMPLATE_TOKENS
        lengths = tokenizer(fitting, add_special_tokens=False)["input_ids"]
        fitting = [p for p, ids in zip(fitting, lengths, strict=True) if len(ids) <= room]
    return fitting
