"""The real demo build, made fast for tests: a tiny Llama stands in for each GGUF model.

Everything `build_source` and `convert_gguf` do runs for real (the staging, the
SHA256 check, `save_pretrained`'s safetensors write, the marker, the rename) except
two slow steps: locating the package's GGUF file (a small stand-in file is written
instead) and dequantising it (the tiny checkpoint is loaded instead). A real build
takes about 25 s and 1 GB of memory per source; this one takes a second.

Run as a module it is a `coe` command line with the tiny demo in place, for tests
that need two builds in two processes:

    python -m tests.unit.actors.weights.tiny_demo TINY_SOURCE CONVERSIONS [GATE] -- ARGS...

CONVERSIONS gets one line per conversion; GATE (a directory) makes the conversion
create GATE/started and wait until GATE/release exists.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from actors.weights import demo
from actors.weights.checkpoint import Progress
from tests.unit.actors.tiny_models import save_tiny_expert

STAND_IN_GGUF = b"GGUF: a stand-in for the package's file\n"
GATE_WAIT_S = 300.0  # a bound, so a broken test fails instead of hanging


class Usage(NamedTuple):
    total: int
    used: int
    free: int


def plenty_of_space(path: object) -> Usage:
    """The tiny build needs kilobytes; the real estimate (hundreds of MB) must not
    make these tests depend on the free space of the machine's temporary directory."""
    return Usage(total=1 << 40, used=0, free=1 << 40)


def make_tiny_source(directory: Path) -> Path:
    return save_tiny_expert(directory, seed=0)


def _locate(work_dir: Path, progress: Progress) -> tuple[Path, str]:
    """Like the Gemma locator: assemble a copy of the model file under `work_dir`."""
    path = work_dir / "downloads" / "tiny.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(STAND_IN_GGUF)
    return path, hashlib.sha256(STAND_IN_GGUF).hexdigest()


def _wait_for_release(gate: Path) -> None:
    (gate / "started").touch()
    deadline = time.monotonic() + GATE_WAIT_S
    while not (gate / "release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate / 'release'} never appeared")
        time.sleep(0.05)


def use_tiny_demo(
    monkeypatch: pytest.MonkeyPatch,
    tiny_source: Path,
    conversions: Path | None = None,
    gate: Path | None = None,
    during_conversion: Callable[[], None] | None = None,
) -> None:
    """Swap the two slow steps of every demo source's build for the tiny checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_model = AutoModelForCausalLM.from_pretrained
    load_tokenizer = AutoTokenizer.from_pretrained

    def dequantise(*args: Any, **kwargs: Any) -> Any:
        if "gguf_file" not in kwargs:  # a test loading a built checkpoint: the real loader
            return load_model(*args, **kwargs)
        if conversions is not None:
            with conversions.open("a", encoding="utf-8") as log:
                log.write(f"{os.getpid()}\n")
        if gate is not None:
            _wait_for_release(gate)
        if during_conversion is not None:
            during_conversion()
        return load_model(str(tiny_source))

    def tokenizer(*args: Any, **kwargs: Any) -> Any:
        if "gguf_file" not in kwargs:
            return load_tokenizer(*args, **kwargs)
        return load_tokenizer(str(tiny_source))

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", dequantise)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer)
    for name in demo.SOURCES:
        monkeypatch.setitem(demo._LOCATORS, name, _locate)
    monkeypatch.setattr(shutil, "disk_usage", plenty_of_space)


def _run_cli(argv: list[str]) -> int:
    """`coe ARGS` with the tiny demo: TINY_SOURCE CONVERSIONS [GATE] -- ARGS."""
    split = argv.index("--")
    paths, cli_args = [Path(a) for a in argv[:split]], argv[split + 1 :]
    from cluster.cli.main import main

    patch = pytest.MonkeyPatch()
    gate = paths[2] if len(paths) > 2 else None
    use_tiny_demo(patch, paths[0], conversions=paths[1], gate=gate)
    return main(cli_args)


if __name__ == "__main__":
    sys.exit(_run_cli(sys.argv[1:]))
