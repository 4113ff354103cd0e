"""The device check: what one GPU must show for the GPU path, in one JSON.

    .venv/bin/python -m benchmarks.device_check --json benchmarks/results/device_check.json

Run by `benchmarks/device_check.sh` (which first runs the CUDA unit tests) on a GPU
machine, from a clone. Parts, each a ratio or a verdict measured in this run:

- `switch_over_pinned_copy`: a tier switch into a GPU arena (the placement service's
  copy: pageable DDR bytes through pinned staging buffers) against one `copy_` of the
  same bytes from an already pinned host buffer, the link's own limit (goal >= 0.8).
- `injected_tokens_equal`: per architecture, greedy tokens of a small random model
  under DeepSpeed's kernel injection, packed in the injected layout and bound into a
  GPU arena as an executor binds it, against plain transformers; true only when every
  architecture that can be injected matched. The others are listed with the reason.
- the scale benchmark's `coe` (two executors on the GPU, the arena there) and
  `multiplex` systems with a GPU share each: `coe_ttft_p99_over_multiplex` (goal
  <= 0.3), `coe_goodput_over_multiplex` (goal >= 2), and whether `coe`'s answers
  equal the experts loaded whole (`coe_answers_match`).

With `--device cpu` (no GPU) the parts that run on a CPU run on a fake device (the
copy ratio, the injection table) and the rest is recorded as not measured; that is
what `make test` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.console import progress as say

# Small random models of each architecture DeepSpeed 0.19 has a policy for, plus the
# demo's two (grouped-query Llama, Gemma 3), which are refused with their reason.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64},
    "opt": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "ffn_dim": 128,
        "word_embed_proj_dim": 64,
        "vocab_size": 128,
        "max_position_embeddings": 64,
    },
    "gpt_neox": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 128,
        "max_position_embeddings": 64,
    },
    "bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128},
    "gptj": {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "vocab_size": 128},
    "gpt_neo": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "attention_types": [[["global", "local"], 1]],
        "vocab_size": 128,
        "max_position_embeddings": 64,
    },
    "llama": {
        "hidden_size": 72,
        "num_hidden_layers": 2,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 128,
        "vocab_size": 128,
    },
    "gemma3_text": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "intermediate_size": 128,
        "vocab_size": 128,
    },
}
PROMPT_IDS = [[5, 17, 42, 9, 88, 3, 61, 20]]
# Weights drawn wider than the default 0.02: a random model's next token then depends
# on the context, so equal tokens mean equal computation, not a repeated token.
SHARP_INIT = {"initializer_range": 0.3}
NEW_TOKENS = 16


def median_seconds(run: Callable[[], None], repeats: int) -> float:
    run()  # warm: staging buffers, CUDA context, first-touch pages
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def switch_against_pinned_copy(nbytes: int, repeats: int, device: str) -> dict[str, Any]:
    """The arena switch's copy against one pinned host -> device `copy_` of the same
    bytes (on the fake device: against a plain `copy_` into the same memory)."""
    from memory_tiers.arena import DeviceArena, Region
    from memory_tiers.packing import align_up
    from memory_tiers.switch import copy_into

    cuda = device == "cuda"
    arena = (DeviceArena.cuda if cuda else DeviceArena.fake_device)(align_up(nbytes))
    region = arena.tensor_view(Region(0, nbytes))
    source = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    staged = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    staged.numpy()[:] = source

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    def switch() -> None:
        copy_into(region, source)
        synchronize()

    def pinned_copy() -> None:
        region.copy_(staged, non_blocking=cuda)
        synchronize()

    pinned_s = median_seconds(pinned_copy, repeats)
    switch_s = median_seconds(switch, repeats)
    copied = arena.read(Region(0, nbytes))
    registered = None
    if cuda:
        try:
            registered = registered_copy_s(region, source, repeats)
        except Exception as error:  # informative only: the switch is what is judged
            say(f"registered copy not measured: {error}")
    return {
        # The alternative to staging: page-lock the DDR buffer itself (once, as the
        # placement service could when it packs an expert) and copy straight from it.
        "registered_copy_s": registered,
        "registered_over_pinned_copy": pinned_s / registered if registered else None,
        "bytes": nbytes,
        "switch_s": switch_s,
        "pinned_copy_s": pinned_s,
        "switch_gb_s": nbytes / switch_s / 1e9,
        "pinned_copy_gb_s": nbytes / pinned_s / 1e9,
        "switch_over_pinned_copy": pinned_s / switch_s,
        "bytes_equal": bool(np.array_equal(copied, source)),
    }


def registered_copy_s(region: torch.Tensor, source: np.ndarray, repeats: int) -> float:
    """A copy from `source` page-locked in place (cudaHostRegister), median seconds."""
    cudart = torch.cuda.cudart()
    pointer, nbytes = source.ctypes.data, source.nbytes
    status = int(cudart.cudaHostRegister(pointer, nbytes, 0))
    if status != 0:
        raise RuntimeError(f"cudaHostRegister failed (cudaError {status})")
    try:
        host = torch.from_numpy(source)

        def copy() -> None:
            region.copy_(host, non_blocking=True)
            torch.cuda.synchronize()

        return median_seconds(copy, repeats)
    finally:
        cudart.cudaHostUnregister(pointer)


def _tiny_model(model_type: str, settings: dict[str, Any]) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    # Token ids inside the small vocabulary (GPT-2's defaults name id 50256).
    config = AutoConfig.for_model(
        model_type,
        **{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **SHARP_INIT, **settings},
    )
    return AutoModelForCausalLM.from_config(config).eval()


def _greedy(model: Any, device: str) -> list[int]:
    ids = torch.tensor(PROMPT_IDS, device=device)
    with torch.inference_mode():
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            disable_compile=True,
            pad_token_id=0,
        )
    return [int(t) for t in output[0, len(PROMPT_IDS[0]) :]]


def injection_check(device: str, dtype: str = "float16") -> dict[str, Any]:
    """Per architecture: refused (and why), or injected tokens against plain ones."""
    from actors.engines.kernel_injection import (
        injected_packed,
        injected_skeleton,
        injection_refusal,
    )
    from memory_tiers.arena import DeviceArena, Region
    from memory_tiers.switch import copy_into

    results: dict[str, Any] = {}
    for model_type, settings in ARCHITECTURES.items():
        model = _tiny_model(model_type, settings)
        refusal = injection_refusal(model.config)
        if refusal is not None:
            results[model_type] = {"injectable": False, "reason": refusal}
            continue
        if device != "cuda":
            results[model_type] = {"injectable": True, "measured": False, "reason": "no GPU"}
            continue
        entry: dict[str, Any] = {"injectable": True, "measured": True}
        try:
            with tempfile.TemporaryDirectory() as directory:
                model.save_pretrained(directory)
                plain = model.to(device=device, dtype=getattr(torch, dtype))
                entry["plain"] = _greedy(plain, device)
                buffer, index = injected_packed(Path(directory), dtype)
                skeleton = injected_skeleton(Path(directory), dtype)
            arena = DeviceArena.cuda(index.total_bytes + 4096)
            region = arena.tensor_view(Region(0, index.total_bytes))
            copy_into(region, buffer)
            bound = skeleton.bind_buffer(region, index)
            entry["injected"] = _greedy(bound, device)
            entry["equal"] = entry["injected"] == entry["plain"]
        except Exception as error:  # one architecture's failure is its verdict
            entry["equal"] = False
            entry["error"] = f"{type(error).__name__}: {error}"[:500]
        results[model_type] = entry
    measured = [r for r in results.values() if r.get("measured")]
    return {
        "architectures": results,
        "injected_tokens_equal": all(r["equal"] for r in measured) if measured else None,
    }


def scale_check(
    gpu_share: float, duration_s: float, workdir: Path, prompts: list[Path] | None = None
) -> dict[str, Any]:
    """The scale benchmark's coe and multiplex systems, each replica with a GPU share."""
    output = workdir / "scale_cuda.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.scale",
        "--systems",
        "coe,multiplex",
        "--gpu-share",
        str(gpu_share),
        "--experts",
        "40",
        "--hbm-experts",
        "8",
        "--executors",
        "2",
        "--rate",
        "4",
        "--duration",
        str(duration_s),
        "--scaling",
        "40",
        "--reference-sample",
        "8",
        "--json",
        str(output),
    ]
    if prompts:
        command += ["--prompts", *map(str, prompts)]
    say("scale benchmark on CUDA: " + " ".join(command[2:]))
    subprocess.run(command, check=True)
    found = json.loads(output.read_text())
    ratios = found["ratios"]
    coe = found["systems"]["coe"]
    return {
        "coe_ttft_p99_over_multiplex": ratios.get("coe_ttft_p99_over_multiplex"),
        "coe_goodput_over_multiplex": ratios.get("coe_goodput_over_multiplex"),
        "coe_answers_match": coe.get("mismatches") == 0 and bool(coe.get("reference_checks")),
        "scale": found,
    }


def device_name(device: str) -> str:
    if device == "cuda":
        return str(torch.cuda.get_device_name(0))
    return "cpu (fake device)"


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    def goal(name: str, measured: Any, met: bool | None) -> dict[str, Any]:
        return {"goal": name, "measured": measured, "met": met}

    switch = result["switch_over_pinned_copy"]
    injected = result["injected_tokens_equal"]
    ttft = result["coe_ttft_p99_over_multiplex"]
    goodput = result["coe_goodput_over_multiplex"]
    cuda = result["device_kind"] == "cuda"
    return [
        goal("arena switch >= 0.8 x pinned copy", switch, switch >= 0.8 if cuda else None),
        goal("injected tokens equal plain transformers", injected, injected),
        goal("coe TTFT p99 <= 0.3 x multiplex", ttft, None if ttft is None else ttft <= 0.3),
        goal("coe goodput >= 2 x multiplex", goodput, None if goodput is None else goodput >= 2),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.device_check",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    add("--copy-mb", type=float, default=512.0, help="bytes of the switch copy, MB")
    add("--repeats", type=int, default=7, help="timed copies per side (median)")
    add("--scale-duration", type=float, default=45.0, help="seconds of arrivals per system")
    add("--gpu-share", type=float, default=0.3, help="GPU share of each serving replica")
    add("--skip-scale", action="store_true", help="leave out the scale benchmark")
    add("--prompts", type=Path, nargs="*", default=None, help="the scale benchmark's prompts")
    add("--json", type=Path, required=True, help="where to write the results")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU (torch.cuda.is_available() is False)")
    if args.copy_mb <= 0 or args.repeats < 1 or args.scale_duration <= 0:
        parser.error("--copy-mb and --scale-duration must be > 0, --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    say(f"device check on {device_name(args.device)}")
    copy = switch_against_pinned_copy(int(args.copy_mb * 1e6), args.repeats, args.device)
    say(f"switch {copy['switch_gb_s']:.2f} GB/s, pinned copy {copy['pinned_copy_gb_s']:.2f} GB/s")
    injection = injection_check(args.device)
    result: dict[str, Any] = {
        "device": device_name(args.device),
        "device_kind": args.device,
        "switch_over_pinned_copy": copy["switch_over_pinned_copy"],
        "copy": copy,
        "injected_tokens_equal": injection["injected_tokens_equal"],
        "injection": injection["architectures"],
        "coe_ttft_p99_over_multiplex": None,
        "coe_goodput_over_multiplex": None,
        "coe_answers_match": None,
    }
    if args.device == "cuda" and not args.skip_scale:
        with tempfile.TemporaryDirectory() as workdir:
            result.update(
                scale_check(args.gpu_share, args.scale_duration, Path(workdir), args.prompts)
            )
    result["goals"] = goals(result)
    result["wall_s"] = time.monotonic() - started
    write_json(args.json, result)
    for entry in result["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[entry["met"]]
        say(f"{entry['goal']}: {entry['measured']} ({verdict})")
    return 0


def write_json(path: Path, result: dict[str, Any]) -> None:
    """The results, replacing an earlier run's file (ours alone: 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(staging, path)


if __name__ == "__main__":
    sys.exit(main())
