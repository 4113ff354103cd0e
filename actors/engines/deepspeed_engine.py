"""The DeepSpeed inference engine.

`deepspeed.init_inference` wraps the loaded model. On CUDA, kernel injection
(DeepSpeed's fused transformer kernels) is used for the architectures that can be
injected (`kernel_injection.injection_refusal` says why the others cannot: the demo's
grouped-query Llama and Gemma 3 among them); everywhere else the model is wrapped
without injection, which generates the same tokens as plain transformers.

A model the engine is given (a tiered one, whose tensors are views into host memory
the tiers manage) is wrapped only where DeepSpeed keeps it where it is, i.e. when
DeepSpeed's accelerator is the CPU. On a GPU machine `init_inference` moves the module
to `cuda:0` (or fills a meta skeleton with fresh CUDA memory), replacing those
views with private copies, and kernel injection swaps the very modules the skeleton
binds into; there the given model is served as it is, without DeepSpeed (the same
tokens a non-injected wrap generates), and the engine says so in the log.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from actors.engines.kernel_injection import PREPARED_MARK, injection_refusal
from actors.engines.transformers_engine import TransformersEngine

logger = logging.getLogger(__name__)


def kernel_injection_supported(config: Any, cuda: bool) -> bool:
    """Whether a model of `config` gets DeepSpeed's kernels (on CUDA, where its
    architecture can be injected)."""
    return cuda and injection_refusal(config) is None


def init_inference_device() -> str:
    """The device type `deepspeed.init_inference` puts a module on: its accelerator's
    (CUDA wherever DeepSpeed finds a GPU, unless DS_ACCELERATOR says otherwise)."""
    from deepspeed.accelerator import get_accelerator

    return str(get_accelerator().device_name())


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
        if not self.owns_model:
            target = init_inference_device()
            if target != "cpu":
                # Wrapping would move the arena's views to private copies on `target`
                # (see the module docstring); serving the model unwrapped keeps it where
                # the tiers bind it. Not marked: nothing was done to the shared module.
                logger.warning(
                    "expert %r: DeepSpeed would move its tiered model to %s; serving it "
                    "where its weights are, without DeepSpeed",
                    self.name,
                    target,
                )
                self.kernel_injection = False
                return model
        import deepspeed

        # Injection replaces modules; a given model's modules are the skeleton's binding
        # points (and on the CPU there are no fused kernels anyway).
        cuda = torch.cuda.is_available()
        self.kernel_injection = self.owns_model and kernel_injection_supported(model.config, cuda)
        refusal = injection_refusal(model.config)
        if cuda and refusal is not None:
            logger.warning("expert %r: no DeepSpeed kernel injection: %s", self.name, refusal)
        wrapped = deepspeed.init_inference(
            model, dtype=dtype, replace_with_kernel_inject=self.kernel_injection
        )
        # The wrapped module keeps transformers' generate(); calling it directly
        # keeps one generation path for both engines.
        setattr(wrapped.module, PREPARED_MARK, self.kernel_injection)
        return wrapped.module
