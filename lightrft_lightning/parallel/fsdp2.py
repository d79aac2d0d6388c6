"""FSDP2 (``fully_shard``) as plain functions over explicit arguments: the device mesh, the mixed-precision
policy, which modules are sharded one by one, and the sharding itself, applied bottom-up.
``LightRFTFSDP`` (under a Trainer and standalone) calls them."""

from __future__ import annotations

import itertools
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from lightrft_lightning.parallel.meta_init import pretrained_weights

# Lightning precision string -> (param_dtype, reduce_dtype) of FSDP2's MixedPrecisionPolicy; gradients are
# always reduced in fp32
PRECISIONS: dict[str, tuple[Optional[torch.dtype], Optional[torch.dtype]]] = {
    "32-true": (None, None),
    "bf16-mixed": (torch.bfloat16, torch.float32),
    "bf16-true": (None, torch.float32),
    "16-mixed": (torch.float16, torch.float32),
    "16-true": (None, torch.float32),
}


def build_mesh(device_type: str, world_size: int, shard_size: Optional[int] = None) -> DeviceMesh:
    """A ``("shard",)`` mesh over all ranks, or ``("replicate", "shard")`` with ``shard_size`` ranks per shard
    group (HSDP) when it is smaller than ``world_size``."""
    size = shard_size or world_size
    if size == world_size:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (world_size // size, size), mesh_dim_names=("replicate", "shard"))


def check_shard_size(world_size: int, size: Optional[int], name: str) -> None:
    """Refuse a ``size`` that is not None or a divisor of ``world_size``, naming the setting ``name``."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1 or world_size % size):
        raise ValueError(f"{name}={size!r} is invalid for world_size={world_size}; "
                         "accepted: None (shard over all ranks) or a divisor of the world size")


def mixed_precision_policy(precision: str, owner: str) -> MixedPrecisionPolicy:
    """The policy for a Lightning precision string; ``owner`` names the strategy in the error."""
    if precision not in PRECISIONS:
        raise ValueError(f"{owner}: precision={precision!r} is not supported; accepted: " + ", ".join(map(repr, PRECISIONS)))
    param_dtype, reduce_dtype = PRECISIONS[precision]
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def block_classes(model: nn.Module, wrap_classes: Sequence[Union[type, str]], owner: str) -> tuple[type, ...]:
    """The module classes sharded one by one: ``wrap_classes`` (classes or class names), else the classes a
    Hugging Face model names in ``_no_split_modules`` (its decoder layers)."""
    names = {c if isinstance(c, str) else c.__name__ for c in wrap_classes}
    if not wrap_classes:
        for module in model.modules():
            names.update(getattr(module, "_no_split_modules", None) or ())
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    if wrap_classes and not classes:
        raise ValueError(f"{owner}: wrap_classes={sorted(names)} match no module of {type(model).__name__}; "
                         "accepted: classes of its submodules")
    return classes


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy, blocks: tuple[type, ...],
               cpu_offload: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each module of a class in ``blocks`` (bottom-up), then ``model`` itself; a model that
    is already sharded is returned unchanged. Each ``fully_shard`` moves only the states it shards to the
    mesh's device, so the whole unsharded model never sits on the device at once. ``cpu_offload`` keeps
    shards, gradients and optimizer state in CPU memory (pinned on CUDA)."""
    if isinstance(model, FSDPModule):
        return model
    kwargs: dict = {"mesh": mesh, "mp_policy": mp_policy, "reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")
    # the sharding order: blocks first, deepest first, so that the root's group holds only what is left
    # (embeddings, final norm, head)
    for module in reversed(list(model.modules())):
        if module is not model and isinstance(module, blocks) and not isinstance(module, FSDPModule):
            fully_shard(module, **kwargs)
    return fully_shard(model, **kwargs)


def reads_pretrained_shards() -> bool:
    """Whether this torch reads a rank's own rows of safetensors (DCP's ``HuggingFaceStorageReader``; older
    versions materialize the whole model before sharding it)."""
    return hasattr(dcp, "HuggingFaceStorageReader")


def load_pretrained_shards(model: nn.Module, device: torch.device) -> None:
    """Give a sharded ``model`` whose parts marked with a checkpoint
    (:func:`~lightrft_lightning.parallel.meta_init.causal_lm_on_meta`) are on the meta device storage on
    ``device`` and the checkpoint's weights: each rank reads only the rows of its own shards from the
    safetensors (DCP's ``HuggingFaceStorageReader``, no collective), so no rank ever holds the whole model.
    What was already real (buffers such as rotary tables, PPO's value head) keeps its values."""
    real = {name: t.detach().clone() for name, t in _states(model) if not t.is_meta}
    model.to_empty(device=device)
    states = dict(_states(model))
    with torch.no_grad():
        for name, tensor in real.items():
            states[name].copy_(tensor)
    for sub in model.modules():
        source = pretrained_weights(sub)
        if source is not None:  # tied weights appear once, under the name the checkpoint has (embed_tokens)
            weights = {source.prefix + name: param for name, param in sub.named_parameters()}
            dcp.load(weights, storage_reader=dcp.HuggingFaceStorageReader(source.path), no_dist=True)


def _states(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return itertools.chain(model.named_parameters(), model.named_buffers())
