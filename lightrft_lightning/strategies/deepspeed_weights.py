"""Full weights and LightRFT's model helpers under :class:`~lightrft_lightning.strategies.deepspeed.LightRFTDeepSpeed`
(a mixin): ZeRO-3 partitions gathered bucket by bucket (weight sync, export), the engines' offload and reload of
their states, the EMA and weight-file loading into partitions, the master weights following a load."""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lightrft_lightning.lightning_api import unwrap_optimizer
from lightrft_lightning.strategies.deepspeed_engines import DeepSpeedModel


class DeepSpeedWeightsMixin:
    """``LightRFTDeepSpeed``'s weights: gathered, offloaded, averaged and loaded through its engines."""

    def named_parameter_buckets(self, model: nn.Module, bucket_bytes: int = 256 * 2**20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """``(name, full tensor)`` buckets of ``model``'s parameters, ZeRO-3 partitions gathered one
        bucket at a time with ``deepspeed.zero.GatheredParameters`` (the engines' weight sync does
        the same). Every rank must consume the whole iterator; a tensor is valid until the next bucket."""
        from lightrft_lightning.engines.weight_sync import iter_weight_buckets

        module = model.module if isinstance(model, DeepSpeedModel) else model
        yield from iter_weight_buckets(module, bucket_bytes)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full (gathered) weights and persistent buffers of ``model`` as CPU tensors, on every rank."""
        module = model.module if isinstance(model, DeepSpeedModel) else model
        state = {name: t.detach().to("cpu", copy=True) for bucket in self.named_parameter_buckets(module) for name, t in bucket}
        for name, buf in module.named_buffers():
            if name.rpartition(".")[2] not in _non_persistent(module, name):
                state[name] = buf.detach().to("cpu", copy=True)
        return state

    def _unwrapped(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DeepSpeedModel) else model

    def _torch_optimizer(self, optimizer: Any) -> Any:
        opt = unwrap_optimizer(optimizer)
        while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):  # DeepSpeed's ZeRO/bf16 wrappers
            opt = opt.optimizer
        return opt

    def offload_model(self, models: Any, empty_cache: bool = True) -> int:
        """As ``StrategyBase.offload_model``. On CUDA a ZeRO-3 training engine offloads all its states
        with DeepSpeed's ``offload_states``; ZeRO-0/1/2 keep parameters in flat buffers that cannot move
        piecewise, so those are refused (on CPU nothing needs to move and 0 is returned)."""
        moved = 0
        on_cpu = self._accelerator_device().type == "cpu"
        for model in [m for m in (models if isinstance(models, (list, tuple)) else [models]) if m is not None]:
            module = self.unwrap_model(model)
            if on_cpu:  # the weights (and ZeRO-3 partitions) already are in CPU memory
                continue
            engine = self._engine(self._inner(model))
            if not self.zero_stage_3 or not getattr(engine, "optimizer", None):
                raise NotImplementedError(
                    "LightRFTDeepSpeed.offload_model on CUDA needs a ZeRO-3 training engine (DeepSpeed's "
                    f"offload_states); zero_stage={self.zero_stage}; accepted: zero_stage=3, or LightRFTFSDP")
            before = torch.cuda.memory_allocated()
            engine.offload_states()
            moved += max(before - torch.cuda.memory_allocated(), 0)
            self._offloaded[id(module)] = self._accelerator_device()
        if empty_cache:
            self.sync_and_clear_cache()
        return moved

    def reload_model(self, models: Any) -> int:
        moved = 0
        for model in [m for m in (models if isinstance(models, (list, tuple)) else [models]) if m is not None]:
            module = self.unwrap_model(model)
            if self._offloaded.pop(id(module), None) is None:
                continue
            before = torch.cuda.memory_allocated()
            self._engine(self._inner(model)).reload_states()
            moved += max(torch.cuda.memory_allocated() - before, 0)
        return moved

    @staticmethod
    def _is_zero3_module(module: nn.Module) -> bool:
        return any(hasattr(p, "ds_id") for p in module.parameters())

    def _ema_update(self, param: torch.Tensor, ema_param: torch.Tensor, beta: float) -> None:
        """ZeRO-3 partitions are gathered (both the model's and the EMA's), as LightRFT does."""
        partitioned = [t for t in (param, ema_param) if hasattr(t, "ds_id")]
        if not partitioned:
            return super()._ema_update(param, ema_param, beta)
        import deepspeed

        modifier = 0 if hasattr(ema_param, "ds_id") else None
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier):
            if modifier is None or dist.get_rank() == 0:
                ema_param.data.mul_(beta).add_(param.data.to(ema_param.device, ema_param.dtype), alpha=1 - beta)

    def load_model(self, model: nn.Module, path: str, map_location: Any = "cpu", strict: bool = False,
                   key_replace_fn: Any = None) -> tuple[list[str], list[str]]:
        """As ``StrategyBase.load_model``; a training engine's fp32 master weights follow the loaded ones."""
        out = super().load_model(model, path, map_location, strict, key_replace_fn)
        inner = self._inner(model)
        if isinstance(inner, DeepSpeedModel) and inner.built and inner.is_training_engine:
            restore = getattr(inner.engine.optimizer, "_restore_from_bit16_weights", None)
            if restore is not None:
                restore()
        return out

    def _load_full_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if not self._is_zero3_module(module):
            return super()._load_full_state(module, state)
        import deepspeed

        params = dict(module.named_parameters())
        for name, tensor in state.items():
            if name in params:
                with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                    if dist.get_rank() == 0:
                        params[name].data.copy_(tensor)
        buffers = {k: v for k, v in state.items() if k not in params}
        if buffers:
            module.load_state_dict(buffers, strict=False)



def _non_persistent(module: nn.Module, buffer_name: str) -> set[str]:
    owner = module.get_submodule(buffer_name.rpartition(".")[0]) if "." in buffer_name else module
    return owner._non_persistent_buffers_set
