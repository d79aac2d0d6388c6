"""Whether a model's forward is a collective: its parameters are FSDP2 shards (DTensor) or DeepSpeed
ZeRO-3 partitions, gathered over the ranks at every forward."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_sharded(param: torch.Tensor) -> bool:
    """An FSDP2 shard (a DTensor) or a DeepSpeed ZeRO-3 partition."""
    return hasattr(param, "full_tensor") or hasattr(param, "ds_id")


def forward_is_collective(model: nn.Module) -> bool:
    """Whether every forward of ``model`` gathers parameters over several ranks, so that all of them must
    run the same number of forwards: ``generate`` then needs ``synced_gpus=True`` (a rank whose sequences
    ended keeps running dummy forwards until every rank's have). transformers sets it by itself only for
    its own DeepSpeed integration and FSDP, not for ``fully_shard`` modules or engines built here."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return any(is_sharded(p) for p in model.parameters())
