"""What vLLM's weight reload leaves undone, shared by the in-process engine and the servers' gloo backend."""

from __future__ import annotations

from typing import Any

import torch


def refresh_shared_weights(model: torch.nn.Module) -> None:
    """Re-run the weight processing of modules that share one weight (a tied ``lm_head``): the layerwise
    reload processes only the modules it was sent tensors for, and a tied ``lm_head`` gets none (its weight
    travels once, as ``embed_tokens``); on CPU that processing keeps a packed copy of the weight for the
    logits GEMM, which would keep the old values. On CUDA that processing is a no-op."""
    shared: dict[int, list[Any]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and hasattr(module, "quant_method"):
            shared.setdefault(id(weight), []).append(module)
    for modules in shared.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)
