"""Pickle-safe reading of DeepSpeed checkpoints.

DeepSpeed reads its own files with ``torch.load(weights_only=False)`` (the engine's
``TorchCheckpointEngine``, ``zero_to_fp32``, the ZeRO-3 optimizer), which runs any code a tampered
checkpoint holds. Every DeepSpeed read in this package runs inside :func:`weights_only_loads`, where
those calls load with ``weights_only=True`` and only DeepSpeed's own checkpoint classes are allowed.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Any, Iterator

import torch

# what DeepSpeed 0.19 pickles besides tensors and plain containers (scanned with
# torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO-0..3 checkpoints, fp32/bf16/fp16)
_DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _allowed() -> list[Any]:
    return [getattr(importlib.import_module(module), name) for module, name in _DEEPSPEED_GLOBALS]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within this context every ``torch.load`` loads with ``weights_only=True`` whatever its caller
    asks, allowing DeepSpeed's checkpoint classes; anything else in a pickle is refused with
    ``UnpicklingError`` naming it."""
    original = torch.load

    def load(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: Any = None,
             **kwargs: Any) -> Any:
        return original(f, map_location=map_location, weights_only=True, **kwargs)

    with torch.serialization.safe_globals(_allowed()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original
