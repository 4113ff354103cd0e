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
`packed_layout` is the one decision the placement service and the replicas both make
(a DeepSpeed expert on GPU tiers whose architecture can be injected), so that they
agree on the expert's source (`expert_source(..., layout)`) and on its skeleton.
Injection needs DeepSpeed's CUDA inference ops: nothing of it runs on a CPU, and
benchmarks/device_check.sh compares injected tokens with plain transformers on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.engines.transformers_engine import default_device
from actors.weights.tiered_weights import SharedSkeleton, skeleton_key
from memory_tiers.ddr import PLAIN_LAYOUT, CheckpointSource, ExpertSource, expert_source
from memory_tiers.packing import TensorIndex, pack_module
from memory_tiers.switch import ModelSkeleton, resolve_dtype

# model_type values DeepSpeed 0.19 has kernel-injection policies for and that
# transformers 5 can run injected. Llama has a policy but is refused (see below).
KERNEL_INJECTION_TYPES = frozenset(
    {"bert", "distilbert", "gpt2", "gptj", "gpt_neo", "gpt_neox", "opt", "bloom"}
)

INJECTED_LAYOUT = "deepspeed-injected"

# Set on a module once DeepSpeed has prepared it (value: whether kernels were injected).
PREPARED_MARK = "_coe_deepspeed_kernel_injection"

# model, dtype -> the injected module (DeepSpeed's on a GPU, `deepspeed_inject`, where
# None is given; a fake in unit tests).
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


def injected_packed(
    checkpoint_dir: Path, dtype: str, inject: Inject | None = None
) -> tuple[np.ndarray, TensorIndex]:
    """The expert's bytes in the injected layout: load it privately, inject, pack the
    injected module's tensors (host bytes, ready for the object store)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(checkpoint_dir), dtype=torch_dtype, use_safetensors=True
    )
    with torch.inference_mode(False):
        injected = (inject or deepspeed_inject)(model.to(default_device()).eval(), torch_dtype)
    return pack_module(injected)


def injected_skeleton(
    checkpoint_dir: Path, dtype: str, inject: Inject | None = None
) -> ModelSkeleton:
    """A skeleton shaped like the injected module, for `injected_packed` bytes.

    Injection needs real tensors (it concatenates and transposes), so it runs once on
    an uninitialised model of the expert's architecture; the skeleton's first bind
    replaces that memory with views into the arena.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    config = AutoConfig.from_pretrained(str(checkpoint_dir))
    with torch.device(default_device()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    injected = (inject or deepspeed_inject)(model.eval(), torch_dtype)
    setattr(injected, PREPARED_MARK, True)
    return ModelSkeleton(injected)


def packed_layout(engine: str, checkpoint_dir: Path, gpu: bool) -> str:
    """The layout an expert is packed in: injected for a DeepSpeed expert whose bytes
    live on a GPU (`gpu`: the tiers are on CUDA) and whose architecture can be injected;
    plain otherwise."""
    if engine != "deepspeed" or not gpu:
        return PLAIN_LAYOUT
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint_dir))
    return INJECTED_LAYOUT if injection_refusal(config) is None else PLAIN_LAYOUT


class InjectedCheckpointSource:
    """An expert source whose bytes are the kernel-injected module's tensors."""

    def __init__(self, directory: Path, dtype: str, inject: Inject | None = None) -> None:
        self.directory = Path(directory)
        self.dtype = dtype
        self.inject = inject

    def build(self) -> tuple[np.ndarray, TensorIndex]:
        return injected_packed(self.directory, self.dtype, self.inject)

    def describe(self) -> str:
        return expert_source(self.directory, self.dtype, INJECTED_LAYOUT)


def checkpoint_source(
    directory: Path, dtype: str, layout: str, inject: Inject | None = None
) -> ExpertSource:
    """What the placement service packs an expert from, in `layout`."""
    if layout == INJECTED_LAYOUT:
        return InjectedCheckpointSource(directory, dtype, inject)
    return CheckpointSource(directory, dtype)


def shared_skeleton(
    checkpoint_dir: Path,
    dtype: str,
    engine: str,
    layout: str = PLAIN_LAYOUT,
    inject: Inject | None = None,
) -> SharedSkeleton:
    """The skeleton an expert packed in `layout` binds into (experts with the same key
    share it on an executor)."""
    key = skeleton_key(checkpoint_dir, dtype, engine, layout)
    if layout == INJECTED_LAYOUT:
        return SharedSkeleton(injected_skeleton(checkpoint_dir, dtype, inject), key)
    return SharedSkeleton(ModelSkeleton.from_checkpoint(checkpoint_dir, dtype), key)
