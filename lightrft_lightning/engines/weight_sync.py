"""Stream an actor's weights to a rollout engine bucket by bucket, without materializing the model.

Each bucket holds at most ``bucket_bytes`` (a parameter larger than that travels alone), so the
extra memory a sync needs is about one bucket plus the largest parameter instead of a full state
dict. Sharded parameters are gathered only when their bucket is reached: FSDP2
``DTensor`` with ``full_tensor()``, DeepSpeed ZeRO-3 parameters with
``deepspeed.zero.GatheredParameters``; plain parameters are used as they are. A LoRA layer's base
weight and adapters share a bucket, and :func:`push_weights` sends them as one merged weight under
the base model's name (the trained model itself is never merged).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

from lightrft_lightning.lora import lora_group, lora_scalings, merge_lora

# wrapper prefixes that are not part of the Hugging Face names (DeepSpeedEngine/DDP, torch.compile,
# FSDP1, activation checkpointing)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

Bucket = list[tuple[str, torch.Tensor]]


def hf_name(name: str) -> str:
    """The Hugging Face name of a parameter: ``name`` without wrapper prefixes anywhere in its path."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace("." + prefix, ".")
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _full_shape(param: torch.Tensor) -> torch.Size:
    # DTensor.shape is already the global shape; a ZeRO-3 parameter keeps it in ds_shape
    return param.ds_shape if _is_zero3(param) else param.shape


def plan_buckets(model: nn.Module, bucket_bytes: int, dtype: Optional[torch.dtype] = None) -> list[list[tuple[str, nn.Parameter]]]:
    """Group ``model``'s parameters (in ``named_parameters`` order) into buckets of at most
    ``bucket_bytes`` once gathered and cast to ``dtype`` (a LoRA layer's parameters are never split).
    Cheap: nothing is gathered."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes!r} is invalid; accepted: an integer >= 1")
    buckets: list[list[tuple[str, nn.Parameter]]] = []
    current: list[tuple[str, nn.Parameter]] = []
    size, group = 0, None
    for name, param in model.named_parameters():
        nbytes = _full_shape(param).numel() * (dtype or param.dtype).itemsize
        same_layer = group is not None and lora_group(name) == group
        group = lora_group(name)
        if current and size + nbytes > bucket_bytes and not same_layer:
            buckets.append(current)
            current, size = [], 0
        current.append((name, param))
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


@torch.no_grad()
def _full_tensor(tensor: torch.Tensor, bucket_bytes: int) -> torch.Tensor:
    """Gather a DTensor. One sharded on dim 0 over a 1-D mesh (FSDP2's layout) and larger than a
    bucket is gathered in row slices of at most a bucket into its output, so the gather's own
    buffers stay within a bucket instead of doubling the parameter (gloo all-gathers through a
    flat copy of the output)."""
    from torch.distributed.tensor import Shard

    mesh = tensor.device_mesh
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes <= bucket_bytes or mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        return tensor.full_tensor()
    import torch.distributed as dist

    local, world, rows = tensor.to_local(), mesh.size(), tensor.shape[0]
    per_rank = -(-rows // world)  # torch.chunk's split: ceil-sized shards, the last ones shorter or empty
    row_bytes = max(1, nbytes // max(rows, 1))
    step = max(1, bucket_bytes // (2 * world * row_bytes))
    out = torch.empty(tensor.shape, dtype=local.dtype, device=local.device)
    for start in range(0, per_rank, step):
        stop = min(start + step, per_rank)
        piece = torch.zeros((stop - start, *tensor.shape[1:]), dtype=local.dtype, device=local.device)
        held = local[start:stop]
        piece[: held.shape[0]] = held
        gathered = torch.empty((world * (stop - start), *tensor.shape[1:]), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(gathered, piece, group=mesh.get_group())
        for rank in range(world):
            first, last = rank * per_rank + start, min(rank * per_rank + stop, rows)
            if last > first:
                out[first:last] = gathered[rank * (stop - start): rank * (stop - start) + last - first]
    return out


@contextlib.contextmanager
def _gathered(bucket: list[tuple[str, nn.Parameter]], dtype: Optional[torch.dtype], bucket_bytes: int,
              scalings: Optional[dict[str, float]] = None) -> Iterator[Bucket]:
    zero3 = [p for _, p in bucket if _is_zero3(p)]
    if zero3:
        import deepspeed  # lazily: only ZeRO-3 models need it

        ctx = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
    else:
        ctx = contextlib.nullcontext()
    with ctx, torch.no_grad():
        out: Bucket = []
        for name, param in bucket:
            tensor = param.detach()
            merging = scalings is not None and lora_group(hf_name(name)) in scalings
            if dtype is not None and tensor.dtype != dtype and not merging:
                tensor = tensor.to(dtype)  # on a DTensor this casts the local shard before the gather
            if hasattr(tensor, "full_tensor"):
                tensor = _full_tensor(tensor, bucket_bytes)
            out.append((hf_name(name), tensor))
        # a merged weight is computed in the stored precision, then cast
        yield out if scalings is None else merge_lora(out, scalings, dtype)


def iter_weight_buckets(model: nn.Module, bucket_bytes: int, dtype: Optional[torch.dtype] = None) -> Iterator[Bucket]:
    """Yield ``model``'s full weights as lists of ``(hf_name, tensor)``, gathered bucket by bucket.

    Every rank of a sharded model must iterate to the end (the gathers are collectives). A tensor
    may alias the live parameter or a gathered buffer: it is valid until the next bucket is asked for.
    """
    for bucket in plan_buckets(model, bucket_bytes, dtype):
        with _gathered(bucket, dtype, bucket_bytes) as tensors:
            yield tensors


def push_weights(model: nn.Module, engine: Any, bucket_bytes: int, dtype: Optional[torch.dtype] = None) -> int:
    """Stream ``model``'s weights into ``engine`` (``None`` on ranks that hold no engine) and return
    the bytes streamed. Every rank must call it, with the same ``dtype`` (``None``: as stored), since
    the buckets, and so the gathers, must match across ranks; the engine casts to its own dtype.
    LoRA layers arrive merged: ``W + (B @ A) * alpha / r`` under the base weight's name. The engine
    takes the whole update as one stream (``load_weight_buckets``), each bucket gathered when reached."""
    scalings = lora_scalings(model, hf_name) or None
    if scalings and getattr(engine, "lora", None) == "adapter":
        return _push_adapter(model, engine, bucket_bytes, dtype, scalings)
    moved = [0]
    source = _stream(model, bucket_bytes, dtype, scalings, moved)
    if engine is not None:
        engine.load_weight_buckets(source)
    for _ in source:  # the gathers are collectives: every rank walks every bucket, with or without an engine
        pass
    if engine is not None:
        engine.finish_weight_update()
    return moved[0]


def _stream(model: nn.Module, bucket_bytes: int, dtype: Optional[torch.dtype], scalings: Optional[dict[str, float]],
            moved: list[int]) -> Iterator[tuple[Bucket, bool]]:
    """``(bucket, last)`` pairs, each bucket gathered (and its LoRA layers merged) when reached; adds the bytes
    yielded to ``moved[0]``."""
    buckets = plan_buckets(model, bucket_bytes, dtype)
    for index, bucket in enumerate(buckets):
        with _gathered(bucket, dtype, bucket_bytes, scalings) as tensors:
            moved[0] += sum(t.numel() * t.element_size() for _, t in tensors)
            yield tensors, index == len(buckets) - 1


def _push_adapter(model: nn.Module, engine: Any, bucket_bytes: int, dtype: Optional[torch.dtype],
                  scalings: dict[str, float]) -> int:
    """Adapter-only sync (an engine with ``lora="adapter"``): only the LoRA parameters, gathered (every rank),
    handed to ``engine.load_adapter(model, state, base)`` as ``{name: tensor}``; returns the bytes moved. An
    engine's first sync also streams the frozen base weights (``base``: the LoRA layers merged with scaling
    0), since its servers may hold another run's weights; after that, the adapter alone."""
    lora = [(name, param) for name, param in model.named_parameters() if "lora_" in name]
    state: dict[str, torch.Tensor] = {}
    with _gathered(lora, None, bucket_bytes) as tensors:
        for name, tensor in tensors:
            state[name] = tensor.detach().clone()
    moved = [sum(t.numel() * t.element_size() for t in state.values())]
    base = None
    if engine.adapter is None:
        base = _stream(model, bucket_bytes, dtype, dict.fromkeys(scalings, 0.0), moved)
    engine.load_adapter(model, state, base)
    for _ in base or ():  # every rank walks every bucket (collectives)
        pass
    return moved[0]
