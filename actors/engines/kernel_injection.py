"""DeepSpeed kernel injection that never touches arena memory: inject at pack time.

`deepspeed.init_inference(..., replace_with_kernel_inject=True)` replaces each decoder
layer with DeepSpeed's fused modules: it concatenates Q/K/V (and gate/up) into new
tensors and transposes others in place. Run on a model bound into the shared arena it
would rewrite bytes every process maps, and later rebinds would reach only the
detached originals. So injection runs once, on a private copy, where an expert is
packed: the packed buffer holds the injected module's tensors (`injected_packed`), and
an executor's skeleton is the injected module itself (`injected_skeleton`), whose
fused parameters a switch rebinds like any others.

Which architectures can be injected at all is decided here, per architecture, with
the reason when not (`injection_refusal`); the others are served without injection.
Injection needs DeepSpeed's CUDA inference ops: nothing of it runs on a CPU, and
benchmarks/device_check.sh compares injected tokens with plain transformers on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory_tiers.packing import TensorIndex, pack_module
from memory_tiers.switch import ModelSkeleton, resolve_dtype

# model_type values DeepSpeed 0.19 has kernel-injection policies for and that
# transformers 5 can run injected. Llama has a policy but is refused (see below).
KERNEL_INJECTION_TYPES = frozenset(
    {"bert", "distilbert", "gpt2", "gptj", "gpt_neo", "gpt_neox", "opt", "bloom"}
)

# Set on a module once DeepSpeed has prepared it (value: whether kernels were injected).
PREPARED_MARK = "_coe_deepspeed_kernel_injection"

# model, dtype -> the injected module (DeepSpeed's on a GPU; a fake in unit tests).
Inject = Callable[[Any, torch.dtype], Any]


def injection_refusal(config: Any) -> str | None:
    """Why the architecture of `config` (a transformers config) cannot be kernel-
    injected, or None when it can."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type == "llama":
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        if kv_heads != heads:
            return (
                f"grouped-query attention ({heads} query heads, {kv_heads} key/value heads): "
                "DeepSpeed 0.19.8's Llama injection fails on it (deepspeedai/DeepSpeed#7282)"
            )
        return (
            "DeepSpeed's injected Llama layers return tuples that transformers 5's Llama "
            "decoder loop does not accept"
        )
    if model_type not in KERNEL_INJECTION_TYPES:
        return f"DeepSpeed 0.19 has no kernel-injection policy for {model_type!r}"
    return None


def deepspeed_inject(model: Any, dtype: torch.dtype) -> Any:
    """DeepSpeed's kernel injection of `model` (on the GPU; its tensors become
    DeepSpeed's fused copies)."""
    if not torch.cuda.is_available():
        raise RuntimeError("kernel injection needs DeepSpeed's CUDA inference ops (no CUDA)")
    import deepspeed

    engine = deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=True)
    injected = engine.module
    setattr(injected, PREPARED_MARK, True)
    return injected


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def injected_packed(
    checkpoint_dir: Path, dtype: str, inject: Inject = deepspeed_inject
) -> tuple[np.ndarray, TensorIndex]:
    """The expert's bytes in the injected layout: load it privately, inject, pack the
    injected module's tensors (host bytes, ready for the object store)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(checkpoint_dir), dtype=torch_dtype, use_safetensors=True
    )
    with torch.inference_mode(False):
        injected = inject(model.to(_device()).eval(), torch_dtype)
    return pack_module(injected)


def injected_skeleton(
    checkpoint_dir: Path, dtype: str, inject: Inject = deepspeed_inject
) -> ModelSkeleton:
    """A skeleton shaped like the injected module, for `injected_packed` bytes.

    Injection needs real tensors (it concatenates and transposes), so it runs once on
    an uninitialised model of the expert's architecture; the skeleton's first bind
    replaces that memory with views into the arena.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    config = AutoConfig.from_pretrained(str(checkpoint_dir))
    with torch.device(_device()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    injected = inject(model.eval(), torch_dtype)
    setattr(injected, PREPARED_MARK, True)
    return ModelSkeleton(injected)
