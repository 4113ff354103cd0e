"""Switch speed: DDR -> HBM through the memory tiers against the loaders users would pick.

    .venv/bin/python -m benchmarks.switch --json OUT.json [--sizes-mb 1024 ...] [--runs 5]
                                          [--store ray|memory] [--no-demo] [--cuda]

For the demo expert checkpoint (SmolLM2 from the demo cache; skipped with a message
when it is not built) and one synthetic Llama-shaped safetensors checkpoint per
``--sizes-mb`` entry, the median of ``--runs`` runs of:

- ``switch_s``: the placement service leases a region of the device arena, copies the
  expert's packed buffer from the object store into it, and the replica's meta-device
  skeleton is rebound as views into it; it ends with a usable model (checked once
  against ``from_pretrained``'s logits);
- ``memcpy_s``: ``numpy.copyto`` of the same bytes between preallocated buffers,
  interleaved with the switches so both see the same machine;
- ``from_pretrained_s``: ``AutoModelForCausalLM.from_pretrained`` (page cache warm);
  transformers maps safetensors lazily, so ``from_pretrained_resident_s`` also times
  faulting every weight page in (where a switch ends: weights in memory);
- ``safetensors_s``: ``safetensors.torch.load_file`` + ``load_state_dict`` into a
  model built beforehand.

The DDR tier is the real Ray object store by default (a local Ray instance is started
and shut down); ``--store memory`` uses the in-process store instead. Writes one JSON
object with a ``sizes`` list; the ratios are what to compare across machines.
``--cuda`` (a GPU machine) adds, per checkpoint, the GPU switch time against one
copy of the same bytes from pinned host memory (the link's limit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory_tiers.ddr import CheckpointSource, InProcessObjectStore, ObjectStore
from memory_tiers.packing import align_up, pack_module
from memory_tiers.placement import DeviceSpec, PlacementService
from memory_tiers.switch import ModelSkeleton

DEVICE = "bench0"
PROMPT = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


def progress(message: str) -> None:
    print(f"[switch] {message}", file=sys.stderr, flush=True)


def median_of(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(runs))


# -- checkpoints ------------------------------------------------------------------------


def demo_checkpoint() -> Path | None:
    cache = Path(os.environ.get("COE_CACHE_DIR") or Path.home() / ".cache" / "coe")
    directory = cache / "smollm2-135m-instruct"
    return directory if (directory / "model.safetensors").is_file() else None


def synthetic_config(size_mb: float) -> Any:
    """A Llama-shaped config whose float32 weights come to about ``size_mb`` MiB."""
    from transformers import LlamaConfig

    hidden, intermediate, vocab = 1024, 2816, 32000
    kv_heads, head_dim = 4, 64
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    per_layer += 3 * hidden * intermediate + 2 * hidden
    target = size_mb * (1 << 20) / 4  # parameters
    embeddings = 2 * vocab * hidden
    if target < embeddings + per_layer:
        vocab = max(256, int((target - per_layer) / (2 * hidden)))
        embeddings = 2 * vocab * hidden
    layers = max(1, round((target - embeddings) / per_layer))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def write_synthetic(directory: Path, size_mb: float) -> Path:
    """Save a random Llama-shaped checkpoint (safetensors) of about ``size_mb`` MiB."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(synthetic_config(size_mb), dtype=torch.float32)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


# -- the object store ---------------------------------------------------------------------


@contextlib.contextmanager
def object_store(kind: str, capacity_bytes: int) -> Iterator[ObjectStore]:
    if kind == "memory":
        yield InProcessObjectStore()
        return
    from cluster.serve.lifecycle import local_ray
    from cluster.serve.object_store import RayObjectStore

    memory = max(capacity_bytes + (512 << 20), 1 << 30)
    # Ray's own logging level (RAY_LOGGER_LEVEL), not the quieter one of the Serve drivers.
    with local_ray(logging_level=None, log_to_driver=False, object_store_memory=memory):
        yield RayObjectStore()


# -- measurements ---------------------------------------------------------------------


def touch_every_page(model: Any) -> None:
    """Read one element per 4 KiB page of every tensor, faulting lazily mapped weights in."""
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen or tensor.numel() == 0:
            continue
        seen.add(tensor.data_ptr())
        tensor.detach().reshape(-1)[:: max(1, 4096 // tensor.element_size())].sum()


def time_from_pretrained(directory: Path, runs: int, resident: bool) -> float:
    """``from_pretrained``; with ``resident``, also until every weight page is in memory.

    transformers maps safetensors files lazily (copy-on-write mmap), so a bare
    ``from_pretrained`` returns before the weights are read; the first forward pass
    pays for that. ``resident`` measures up to the point our switch ends at.
    """
    from transformers import AutoModelForCausalLM

    def once() -> float:
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
        if resident:
            with torch.inference_mode():
                touch_every_page(model)
        elapsed = time.perf_counter() - started
        del model
        return elapsed

    once()  # page cache warm, lazy imports done
    return median_of(runs, once)


def time_safetensors(directory: Path, runs: int) -> float:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(str(directory)), dtype=torch.float32
    )
    files = sorted(directory.glob("*.safetensors"))

    def once() -> float:
        started = time.perf_counter()
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))
        result = model.load_state_dict(state, strict=False)
        elapsed = time.perf_counter() - started
        if result.unexpected_keys:
            raise RuntimeError(f"unexpected keys in {directory}: {result.unexpected_keys[:5]}")
        del state
        return elapsed

    once()
    return median_of(runs, once)


def measure_cuda(
    directory: Path, source: np.ndarray, index: Any, expected: torch.Tensor, runs: int
) -> dict[str, Any]:
    """The GPU switch (pinned staging, chunked async copies) against pinned H2D bandwidth.

    ``pinned_h2d_s`` is one ``copy_`` of the same bytes from an already pinned host
    buffer: the limit of this machine's host-to-device link. The switch starts from
    the pageable object-store buffer, as it does in service.
    """
    from memory_tiers.arena import DeviceArena, Region
    from memory_tiers.switch import copy_into

    nbytes = source.size
    arena = DeviceArena.cuda(align_up(nbytes))
    region = arena.tensor_view(Region(0, nbytes))
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pinned.numpy()[:] = source
    skeleton = ModelSkeleton.from_checkpoint(directory, "float32")

    def h2d_once() -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        region.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def switch_once() -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        copy_into(region, source)
        skeleton.bind_buffer(region, index)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    h2d_once()
    switch_once()
    h2d_times, switch_times = [], []
    for _ in range(runs):
        h2d_times.append(h2d_once())
        switch_times.append(switch_once())
    with torch.inference_mode():
        logits = skeleton.model(PROMPT.to(region.device)).logits.cpu()
    switch_s = statistics.median(switch_times)
    h2d_s = statistics.median(h2d_times)
    return {
        "device": torch.cuda.get_device_name(region.device),
        "switch_s": switch_s,
        "pinned_h2d_s": h2d_s,
        "switch_gbps": nbytes / switch_s / 1e9,
        "pinned_h2d_gbps": nbytes / h2d_s / 1e9,
        "h2d_ratio": h2d_s / switch_s,
        "logits_max_abs_diff": float((logits - expected).abs().max()),
    }


def time_forward(model: Any, runs: int) -> float:
    """One forward pass of the prompt: whether weights in the object store's shared
    memory run as fast as weights in the arena."""

    def once() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model(PROMPT)
        return time.perf_counter() - started

    once()
    return median_of(runs, once)


def measure_zero_copy(
    name: str, directory: Path, service: PlacementService, index: Any, runs: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """Binding a skeleton straight to the object store's read-only buffer (no arena copy):
    what a CPU node, where DDR and "HBM" are the same memory, could do instead."""
    progress(f"{name}: {runs} zero-copy binds to the object-store buffer")
    skeleton = ModelSkeleton.from_checkpoint(directory, "float32")

    def once() -> float:
        started = time.perf_counter()
        skeleton.bind_buffer(service.ddr_buffer(name), index)
        return time.perf_counter() - started

    once()
    seconds = median_of(runs, once)
    with torch.inference_mode():
        logits = skeleton.model(PROMPT).logits
    measured = {"zero_copy_s": seconds, "forward_store_s": time_forward(skeleton.model, runs)}
    return measured, logits


def measure_switch(
    name: str, directory: Path, runs: int, store: ObjectStore, arena_dir: Path, cuda: bool
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    progress(f"{name}: packing into the object store")
    reference = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    packed = pack_module(reference)
    with torch.inference_mode():
        expected = reference(PROMPT).logits
    del reference
    nbytes = packed[1].total_bytes
    spec = DeviceSpec(
        DEVICE, align_up(nbytes), arena="file", arena_path=arena_dir / f"{name}.arena"
    )
    service = PlacementService([spec], store)
    service.register(name, CheckpointSource(directory), packed=packed)
    del packed
    skeleton = ModelSkeleton.from_checkpoint(directory, "float32")
    arena = service.arena(DEVICE)
    index = service.index(name)

    source = service.ddr_buffer(name)
    target = np.empty(nbytes, dtype=np.uint8)
    target.fill(0)  # preallocated and faulted in, like the arena

    def memcpy_once() -> float:
        started = time.perf_counter()
        np.copyto(target, source)
        return time.perf_counter() - started

    def copy_seconds() -> float:
        return float(service.metrics()["devices"][DEVICE]["switch_seconds"])

    copy_times: list[float] = []

    def switch_once() -> float:
        copied_before = copy_seconds()
        started = time.perf_counter()
        lease = service.acquire(name, DEVICE)
        skeleton.bind_buffer(arena.host_view(lease.region), index, lease.generation)
        elapsed = time.perf_counter() - started
        if not lease.needs_copy:
            raise RuntimeError("the benchmark switch found the expert already resident")
        copy_times.append(copy_seconds() - copied_before)
        service.release(lease)
        service.evict(name, DEVICE)
        return elapsed

    progress(f"{name}: {runs} switches and copies of {nbytes / 2**20:.0f} MiB, interleaved")
    memcpy_once()
    switch_once()  # first touch of the object-store mapping in this process
    copy_times.clear()
    memcpy_times, switch_times = [], []
    for _ in range(runs):
        memcpy_times.append(memcpy_once())
        switch_times.append(switch_once())
    lease = service.acquire(name, DEVICE)
    model = skeleton.bind_buffer(arena.host_view(lease.region), index, lease.generation)
    with torch.inference_mode():
        usable = bool(torch.equal(model(PROMPT).logits, expected))
    measured, zero_copy_logits = measure_zero_copy(name, directory, service, index, runs)
    measured["zero_copy_usable"] = bool(torch.equal(zero_copy_logits, expected))
    measured["forward_arena_s"] = time_forward(model, runs)
    measured["forward_store_over_arena"] = measured["forward_store_s"] / measured["forward_arena_s"]
    service.release(lease)
    if cuda:
        progress(f"{name}: {runs} GPU switches against pinned host-to-device copies")
        measured["cuda"] = measure_cuda(directory, source, index, expected, runs)
    service.close()
    return {
        **measured,
        "bytes": nbytes,
        "switch_s": statistics.median(switch_times),
        "memcpy_s": statistics.median(memcpy_times),
        "copy_s": statistics.median(copy_times),  # the bulk copy alone, inside switch_s
        "tensors": len(index.entries),
        "usable_model": usable,
    }


def measure(
    name: str, directory: Path, runs: int, store: ObjectStore, arena_dir: Path, cuda: bool
) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "checkpoint": str(directory)}
    entry.update(measure_switch(name, directory, runs, store, arena_dir, cuda))
    progress(f"{name}: from_pretrained x{runs}, then x{runs} until resident")
    entry["from_pretrained_s"] = time_from_pretrained(directory, runs, resident=False)
    entry["from_pretrained_resident_s"] = time_from_pretrained(directory, runs, resident=True)
    progress(f"{name}: safetensors load_file + load_state_dict x{runs}")
    entry["safetensors_s"] = time_safetensors(directory, runs)
    switch = entry["switch_s"]
    entry["switch_gbps"] = entry["bytes"] / switch / 1e9
    entry["memcpy_gbps"] = entry["bytes"] / entry["memcpy_s"] / 1e9
    entry["memcpy_ratio"] = entry["memcpy_s"] / switch
    entry["speedup_vs_from_pretrained"] = entry["from_pretrained_s"] / switch
    entry["speedup_vs_from_pretrained_resident"] = entry["from_pretrained_resident_s"] / switch
    entry["speedup_vs_safetensors"] = entry["safetensors_s"] / switch
    entry["switch_over_zero_copy"] = switch / entry["zero_copy_s"]
    return entry


def print_table(sizes: list[dict[str, Any]]) -> None:
    header = (
        f"{'checkpoint':<24}{'MiB':>8}{'switch ms':>11}{'memcpy ms':>11}"
        f"{'memcpy/sw':>11}{'vs f_p':>9}{'vs f_p+res':>12}{'vs st':>8}"
    )
    print(header)
    for entry in sizes:
        print(
            f"{entry['name']:<24}{entry['bytes'] / 2**20:>8.0f}"
            f"{entry['switch_s'] * 1e3:>11.1f}{entry['memcpy_s'] * 1e3:>11.1f}"
            f"{entry['memcpy_ratio']:>11.2f}{entry['speedup_vs_from_pretrained']:>9.1f}"
            f"{entry['speedup_vs_from_pretrained_resident']:>12.1f}"
            f"{entry['speedup_vs_safetensors']:>8.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")
    parser.add_argument(
        "--sizes-mb", type=float, nargs="*", default=[1024.0], help="synthetic checkpoint sizes"
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--store", choices=["ray", "memory"], default="ray", help="DDR store")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo checkpoint")
    parser.add_argument(
        "--cuda", action="store_true", help="also time GPU switches against pinned H2D copies"
    )
    args = parser.parse_args(argv)
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda needs CUDA, which is not available")
    if args.runs < 1 or any(size <= 0 for size in args.sizes_mb):
        parser.error("--runs and every --sizes-mb must be positive")

    work = Path(tempfile.mkdtemp(prefix="coe-switch-"))
    arena_dir = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    arena_dir = Path(tempfile.mkdtemp(prefix="coe-switch-arena-", dir=arena_dir))
    checkpoints: list[tuple[str, Path]] = []
    demo = None if args.no_demo else demo_checkpoint()
    if demo is not None:
        checkpoints.append(("smollm2-135m-instruct", demo))
    elif not args.no_demo:
        progress("demo checkpoint not built (run `coe demo build`); measuring synthetic only")
    try:
        for size in args.sizes_mb:
            name = f"synthetic-{size:g}mb"
            progress(f"writing {name} (random Llama-shaped, safetensors)")
            checkpoints.append((name, write_synthetic(work / name, size)))
        capacity = sum(
            sum(f.stat().st_size for f in d.glob("*.safetensors")) for _, d in checkpoints
        )
        with object_store(args.store, capacity) as store:
            sizes = [
                measure(name, path, args.runs, store, arena_dir, args.cuda)
                for name, path in checkpoints
            ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(arena_dir, ignore_errors=True)
    result = {
        "benchmark": "switch",
        "store": args.store,
        "runs": args.runs,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "sizes": sizes,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print_table(sizes)
    for entry in sizes:
        if "cuda" in entry:
            gpu = entry["cuda"]
            print(
                f"{entry['name']}: GPU switch {gpu['switch_gbps']:.1f} GB/s, pinned H2D "
                f"{gpu['pinned_h2d_gbps']:.1f} GB/s, ratio {gpu['h2d_ratio']:.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
