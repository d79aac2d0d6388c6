"""The ranks' data-parallel layout and the collectives over it, for every strategy (a mixin of
:class:`~lightrft_lightning.strategies.base.StrategyBase`): with ``sp_size > 1`` the ``("dp", "sp")`` mesh of
sequence parallelism (the ranks of one sp group hold one sample's shards), ``dp_rank`` / ``dp_world_size``,
and LightRFT's ``all_reduce`` / ``all_gather`` / ``print`` / ``is_rank_0`` over the data-parallel ranks."""

from __future__ import annotations

import builtins
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lightrft_lightning import process_group
from lightrft_lightning.parallel import ulysses
from lightrft_lightning.strategies.lightrft_compat import _is_hf_model

ReduceOp = str
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class DataParallelMixin:
    """The ``(dp, sp)`` layout of the ranks and the collectives over the data-parallel ones; ``config`` is the
    strategy's ``StrategyConfig``."""

    config: Any

    def _init_data_parallel(self) -> None:
        self.sp_mesh_device: Optional[DeviceMesh] = None
        self._sp_group: Optional[dist.ProcessGroup] = None
        self._dp_group: Optional[dist.ProcessGroup] = None

    def _setup_sequence_parallel(self, device_type: str) -> None:
        """With ``sp_size > 1``: the ``("dp", "sp")`` mesh (``sp_mesh_device``, LightRFT's name), its groups, and
        the process's sequence-parallel group for the attention hook (see :mod:`~lightrft_lightning.parallel.ulysses`)."""
        sp = self.config.sp_size
        if sp == 1 or self.sp_mesh_device is not None:
            return
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        ulysses.check_sp_size(world, sp)
        self.sp_mesh_device = ulysses.build_mesh(device_type, world, sp)
        self._sp_group = self.sp_mesh_device["sp"].get_group()
        self._dp_group = self.sp_mesh_device["dp"].get_group()
        ulysses.set_group(self._sp_group)

    def _enable_sequence_parallel(self, module: Any) -> None:
        """Route the attention of every Hugging Face model in ``module`` through the Ulysses hook (a forward that
        is not sequence-sharded passes through it unchanged)."""
        if self.config.sp_size == 1 or not isinstance(module, nn.Module):
            return
        for m in module.modules():
            if _is_hf_model(m):
                ulysses.enable(m)

    @property
    def sp_size(self) -> int:
        """Ranks per sequence (``StrategyConfig.sp_size``)."""
        return self.config.sp_size

    @property
    def sp_data_processor(self) -> ulysses.SequenceParallelData:
        """LightRFT's ``SPDataProcessor``: ``preprocess`` gathers the sp group's items, ``postprocess`` keeps this
        rank's share; the identity with ``sp_size`` 1."""
        return ulysses.SequenceParallelData(self._sp_group)

    def _process_rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def dp_world_size(self) -> int:
        """Data-parallel ranks: all processes // ``sp_size``."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return world // self.config.sp_size if self._sp_group is not None else world

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel rank (the ranks of one sp group share it)."""
        return self._process_rank() // self.config.sp_size if self._sp_group is not None else self._process_rank()

    # ------------------------------------------------------------------ collectives and logging
    def is_rank_0(self) -> bool:
        return self._process_rank() == 0

    def print(self, *msg: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only."""
        if self.is_rank_0():
            builtins.print(*msg, **kwargs)

    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def all_reduce(self, data: Any, op: ReduceOp = "mean") -> Any:
        """Reduce a tensor, a number or a (nested) dict of them over all ranks with ``op`` in
        "mean", "sum" or "max". Numbers come back as numbers, tensors on their own device."""
        if op not in _REDUCE_OPS:
            raise ValueError(f"all_reduce: op={op!r} is invalid; accepted: 'mean', 'sum', 'max'")
        if isinstance(data, dict):
            if data and self.dp_world_size > 1 and all(isinstance(v, (int, float)) for v in data.values()):
                reduced = self.all_reduce(torch.tensor(list(data.values()), dtype=torch.float64), op)
                return dict(zip(data, reduced.tolist()))  # numbers: one collective for all of them
            return {k: self.all_reduce(v, op) for k, v in data.items()}
        is_tensor = isinstance(data, torch.Tensor)
        if self.dp_world_size == 1:
            return data
        tensor = data.clone() if is_tensor else torch.tensor(data, dtype=torch.float64)
        out = tensor.to(process_group.collective_device(tensor.device))
        dist.all_reduce(out, op=_REDUCE_OPS[op], group=self._dp_group)  # the ranks of an sp group hold the same data
        if op == "mean":
            out = out / self.dp_world_size
        return out.to(tensor.device) if is_tensor else out.item()

    def all_gather(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """Gather a tensor, a number or a (nested) dict of them from all ranks, concatenated along
        dim 0 (numbers become a 1-D tensor of ``world_size`` values).

        Called with Lightning's ``group=``/``sync_grads=`` (as ``LightningModule.all_gather`` does),
        it is Lightning's ``all_gather``, which stacks along a new dim 0."""
        if args or kwargs:
            return super().all_gather(data, *args, **kwargs)  # type: ignore[misc]
        if isinstance(data, dict):
            return {k: self.all_gather(v) for k, v in data.items()}
        tensor = data if isinstance(data, torch.Tensor) else torch.tensor([data])
        if tensor.dim() == 0:
            tensor = tensor.unsqueeze(0)
        if self.dp_world_size == 1:
            return tensor
        device = process_group.collective_device(tensor.device)
        parts = [torch.empty_like(tensor, device=device) for _ in range(self.dp_world_size)]
        dist.all_gather(parts, tensor.to(device), group=self._dp_group)
        return torch.cat(parts).to(tensor.device)
