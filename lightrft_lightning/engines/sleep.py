"""The one sleep/wake path: ``RolloutEngineCallback`` and the strategy's engine calls
(``engines_sleep`` / ``engines_wake_up``, ``maybe_sleep_inference_engine`` / ``wakeup_inference_engine``)
put engines to sleep and wake them through these two functions."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch

from lightrft_lightning.engines import memory


def sleep_engines(engines: Iterable[Any], level: Optional[int]) -> None:
    """Put each engine to sleep at ``level`` (1: weights kept in CPU memory, 2: weights dropped) and
    return the memory PyTorch caches to the device; ``None`` keeps them awake (``enable_engine_sleep=False``)."""
    if level is None:
        return
    for engine in engines:
        engine.sleep(level=level)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the engine freed goes back to the driver, for training to use


def wake_engines(engines: Iterable[Any], tags: Optional[Sequence[str]] = None, mem_util: Optional[float] = None) -> None:
    """Wake each engine's ``tags`` (a subset of ["weights", "kv_cache"]; ``None``: both). ``mem_util``: the
    device-memory fraction of a vLLM/SGLang engine, which maps all of it again when it wakes: on CUDA,
    PyTorch's cached blocks go back to the driver first and a device without that much free is refused
    with the setting to change (:func:`~lightrft_lightning.engines.memory.check_wake_fits`)."""
    engines = list(engines)
    if mem_util is not None and any(getattr(e, "is_sleeping", False) for e in engines):
        available = memory.device_memory()
        if available is not None:
            memory.check_wake_fits(memory.engine_budget(mem_util, available.total), available, mem_util)
    for engine in engines:
        engine.wake_up(tags=list(tags) if tags is not None else None)
