"""The device-memory budget of a colocated engine (vLLM, SGLang) next to the trainer on one GPU.

vLLM (0.32, ``vllm/v1/worker/utils.py:request_memory``) refuses to start unless the device has
``ceil(gpu_memory_utilization x total)`` bytes free, and takes that much (weights, activations, the
rest as KV cache); with sleep mode it gives it back at sleep and maps the same sizes again at every
wake. What the trainer holds while the engine is awake (its weights, the reference, the optimizer
state, which a PyTorch optimizer only allocates at its first step, and what PyTorch's caching
allocator keeps) must fit beside it. These functions check that with the numbers
``torch.cuda.mem_get_info`` gives, and say which setting to change, before vLLM fails deep inside
its allocator. On CPU there is no budget to check (vLLM's CPU KV cache is fixed, no sleep mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

GiB = float(1 << 30)


@dataclass(frozen=True)
class DeviceMemory:
    """Free and total bytes of one device (``torch.cuda.mem_get_info``)."""

    free: int
    total: int


def device_memory(device: Any = None) -> Optional[DeviceMemory]:
    """The free and total bytes of ``device`` (default: the current CUDA device), after returning PyTorch's
    cached blocks to the driver (an engine maps memory outside PyTorch's allocator, so blocks PyTorch
    caches are not free for it); ``None`` off CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(int(free), int(total))


def engine_budget(mem_util: float, total: int) -> int:
    """The bytes a vLLM engine requests at start and holds while awake: ``ceil(mem_util x total)``."""
    return math.ceil(total * mem_util)


def pending_optimizer_bytes(optimizers: Iterable[Any]) -> int:
    """The bytes of optimizer state not allocated yet on this rank: a PyTorch Adam/AdamW allocates two
    tensors per parameter (``exp_avg``, ``exp_avg_sq``, each the size of the local parameter or shard)
    at its first step; optimizers that already hold state (or DeepSpeed's, built with their state) add 0."""
    pending = 0
    for optimizer in optimizers:
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or inner.state:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    local = param.to_local() if hasattr(param, "to_local") else param
                    pending += 2 * local.numel() * local.element_size()
    return pending


def check_engine_fits(mem_util: float, memory: DeviceMemory, pending_bytes: int = 0) -> int:
    """Refuse to build an engine of ``mem_util`` x total bytes when the device does not have them free now
    (vLLM's own start check) or will not once the trainer has allocated ``pending_bytes`` more (the
    optimizer state of the first step), which the engine would then fail to map at its next wake.
    Returns the engine's budget in bytes."""
    budget = engine_budget(mem_util, memory.total)
    room = memory.free - pending_bytes
    if budget > room:
        fits = math.floor(max(room, 0) / memory.total * 100) / 100
        pending = (f" less {pending_bytes / GiB:.1f} GiB of optimizer state the first step will allocate"
                   if pending_bytes else "")
        raise ValueError(
            f"StrategyConfig.engine_mem_util={mem_util} asks the colocated engine for {budget / GiB:.1f} GiB of the "
            f"device's {memory.total / GiB:.1f} GiB at every wake, but {memory.free / GiB:.1f} GiB are free{pending} "
            f"(the trainer keeps its weights, reference and optimizer state while the engine is awake); accepted: "
            f"engine_mem_util <= {fits:.2f}, or less training state per device (more ranks, zero_stage=3, "
            "adam_offload / fsdp_cpu_offload, LoRA)")
    return budget


def check_wake_fits(budget: int, memory: Optional[DeviceMemory], mem_util: float) -> None:
    """Refuse to wake an engine whose ``budget`` bytes are not free (the trainer grew since the engine was
    built: activations or gradients still held, a cache not emptied), with what to change, instead of
    an out-of-memory error inside the engine's allocator. ``memory=None`` (no CUDA): nothing to check."""
    if memory is None or memory.free >= budget:
        return
    held = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    raise RuntimeError(
        f"the colocated engine needs {budget / GiB:.1f} GiB to wake (StrategyConfig.engine_mem_util={mem_util} of "
        f"{memory.total / GiB:.1f} GiB) but {memory.free / GiB:.1f} GiB are free, with {held / GiB:.1f} GiB held by "
        f"PyTorch tensors of the trainer; accepted: engine_mem_util <= "
        f"{math.floor(memory.free / memory.total * 100) / 100:.2f}, or drop what the trainer keeps between steps "
        "(gradients, activations, tensors kept on the module)")
