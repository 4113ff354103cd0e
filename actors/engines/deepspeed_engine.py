"""The DeepSpeed inference engine.

`deepspeed.init_inference` wraps the loaded model. On CUDA, kernel injection
(DeepSpeed's fused transformer kernels) is used for the architectures DeepSpeed
has injection policies for; everywhere else the model is wrapped without
injection, which generates the same tokens as plain transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from actors.engines.transformers_engine import TransformersEngine

# model_type values that DeepSpeed 0.19's kernel-injection policies cover.
KERNEL_INJECTION_TYPES = frozenset(
    {"bert", "distilbert", "gpt2", "gptj", "gpt_neo", "gpt_neox", "opt", "bloom", "llama"}
)

# Set on a module once DeepSpeed has wrapped it (value: whether kernels were injected).
PREPARED_MARK = "_coe_deepspeed_kernel_injection"


def kernel_injection_supported(model_type: str, cuda: bool) -> bool:
    return cuda and model_type in KERNEL_INJECTION_TYPES


class DeepSpeedEngine(TransformersEngine):
    """A `TransformersEngine` whose model runs under `deepspeed.init_inference`."""

    kernel_injection: bool = False

    def _prepare(self, model: Any, dtype: torch.dtype) -> Any:
        # Experts that share one skeleton on an executor share its preparation too:
        # wrapping the same module twice would inject kernels into injected kernels.
        prepared = getattr(model, PREPARED_MARK, None)
        if prepared is not None:
            self.kernel_injection = bool(prepared)
            return model
        import deepspeed

        self.kernel_injection = kernel_injection_supported(
            model.config.model_type, torch.cuda.is_available()
        )
        wrapped = deepspeed.init_inference(
            model, dtype=dtype, replace_with_kernel_inject=self.kernel_injection
        )
        # The wrapped module keeps transformers' generate(); calling it directly
        # keeps one generation path for both engines.
        setattr(wrapped.module, PREPARED_MARK, self.kernel_injection)
        return wrapped.module
