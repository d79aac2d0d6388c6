"""The one sleep/wake path: ``RolloutEngineCallback`` and the strategy's engine calls
(``engines_sleep`` / ``engines_wake_up``, ``maybe_sleep_inference_engine`` / ``wakeup_inference_engine``)
put engines to sleep and wake them through these two functions."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch


def sleep_engines(engines: Iterable[Any], level: Optional[int]) -> None:
    """Put each engine to sleep at ``level`` (1: weights kept in CPU memory, 2: weights dropped) and
    return the memory PyTorch caches to the device; ``None`` keeps them awake (``enable_engine_sleep=False``)."""
    if level is None:
        return
    for engine in engines:
        engine.sleep(level=level)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the engine freed goes back to the driver, for training to use


def wake_engines(engines: Iterable[Any], tags: Optional[Sequence[str]] = None) -> None:
    """Wake each engine's ``tags`` (a subset of ["weights", "kv_cache"]; ``None``: both)."""
    for engine in engines:
        engine.wake_up(tags=list(tags) if tags is not None else None)
