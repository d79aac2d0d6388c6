"""LightRFT's compatibility helpers: :class:`LightRFTCompatMixin`, the strategy calls LightRFT's trainers and
examples make beyond what every strategy is (model set-up with ``prepare_model`` /
``prepare_models_and_optimizers`` / ``prepare_reward_model``, meta init with ``init_model_context``,
``setup_dataloader`` with resume, offload/reload of weights and optimizer state, ``moving_average``,
``load_model``, ``report_memory``), and the module-level pieces only they use (LightRFT's scheduler and
resumable sampler, the ``is_actor`` / ``is_engine`` conventions). Meta init itself is
:mod:`lightrft_lightning.parallel.meta_init`.

``StrategyBase`` inherits the mixin; the backends override its small hooks (``_move_model``,
``_load_full_state``, ``_ema_update``, ``_torch_optimizer``) where they shard or partition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from typing import Any, Callable, Iterator, Optional, Union

import torch
from lightning.fabric.utilities.seed import seed_everything
from torch import nn
from torch.optim import Optimizer

from lightrft_lightning.config import StrategyConfig
from lightrft_lightning.lightning_api import unwrap_optimizer
from lightrft_lightning.parallel.meta_init import has_meta, materialize_meta, parameters_on_meta

log = logging.getLogger(__name__)


def is_actor(model: Any) -> bool:
    """LightRFT's convention: a wrapper with ``is_actor = True`` whose ``.model`` is the Hugging Face model;
    optimizer, engine, checkpoints and export act on ``model.model``."""
    return bool(getattr(model, "is_actor", False)) and isinstance(getattr(model, "model", None), nn.Module)


def is_engine(model: Any) -> bool:
    """LightRFT's test for a rollout engine (it can wake up)."""
    return hasattr(model, "wake_up")


def lightrft_config(owner: str, config: Any, args: Any, values: dict[str, Any]) -> StrategyConfig:
    """The config of a strategy built either the Lightning way (``config``) or the LightRFT way
    (``seed=..., max_norm=..., ..., args=args``): read from ``config`` or ``args``, then the LightRFT
    constructor values that were given override the fields of the same name (one source of truth:
    ``strategy.max_norm`` is ``strategy.config.max_norm``)."""
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        raise TypeError(f"{owner}({config!r}, ...): pass LightRFT's constructor values as keywords ({owner}(seed=..., "
                        "max_norm=..., micro_train_batch_size=..., train_batch_size=..., args=...)); the first "
                        "positional argument is a StrategyConfig or an args object")
    if config is not None and args is not None:
        raise TypeError(f"{owner}: got both config= and args=; accepted: one of them (args is LightRFT's name)")
    cfg = StrategyConfig.from_args(config if config is not None else args)
    given = {k: v for k, v in values.items() if v is not None}
    return dataclasses.replace(cfg, **given) if given else cfg


def _config_field(name: str) -> property:
    def get(self: Any) -> Any:
        return getattr(self.config, name)

    def set_(self: Any, value: Any) -> None:
        self.config = dataclasses.replace(self.config, **{name: value})

    return property(get, set_, doc=f"``config.{name}`` (LightRFT's constructor attribute; setting it validates)")


class LightRFTCompatMixin:
    """LightRFT's model, data, memory and weight-file helpers, mixed into :class:`StrategyBase` (which
    provides ``config``, ``prepare``, ``create_optimizer``, ``unwrap_model``, ``print`` and the rank
    properties they build on)."""

    # LightRFT's constructor attributes: views of the config (one source of truth)
    seed = _config_field("seed")
    max_norm = _config_field("max_norm")
    micro_train_batch_size = _config_field("micro_train_batch_size")
    train_batch_size = _config_field("train_batch_size")

    @property
    def args(self) -> Any:
        """The object the config was read from (LightRFT code reads ``strategy.args.x``)."""
        return self.config.args if self.config.args is not None else self.config

    def get_rank(self) -> int:
        """This process's rank (0 without a process group)."""
        return self._process_rank()

    def set_seed(self, seed: int) -> None:
        """Seed python, numpy and torch (CPU and CUDA) with ``seed``."""
        seed_everything(seed, verbose=False)

    def _args_config(self, args: Any) -> StrategyConfig:
        if args is None or args is self.config.args or args is self.config:
            return self.config
        return StrategyConfig.from_args(args)

    def _init_lightrft_compat(self) -> None:
        """The mixin's state (called by ``StrategyBase.__init__``)."""
        self._offloaded: dict[int, torch.device] = {}
        self.time_steps: dict[str, int] = {}

    @property
    def accumulated_gradient(self) -> int:
        """LightRFT's name of :attr:`accumulation_steps`."""
        return self.accumulation_steps

    def memory_stats(self) -> dict[str, float]:
        """This process's memory in GB: ``rss`` (resident set, from /proc) and on CUDA ``allocated``,
        ``reserved`` and ``driver_used``."""
        stats = {"rss": _rss_bytes() / 1e9}
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            stats.update(allocated=torch.cuda.memory_allocated() / 1e9, reserved=torch.cuda.memory_reserved() / 1e9,
                         driver_used=(total - free) / 1e9)
        return stats

    def report_memory(self, prefix: str = "") -> dict[str, float]:
        """Print :meth:`memory_stats` on rank 0 (LightRFT prints CUDA figures only) and return them."""
        stats = self.memory_stats()
        self.print(f"MEMORY STATUS: {prefix}, " + ", ".join(f"{k.upper()}={v:.3f} GB" for k, v in stats.items()))
        return stats

    def prepare_model(self, model: Any, is_training: bool = False, shard_size: Union[int, str] = -1,
                      reshard_after_forward: bool = True) -> Any:
        """LightRFT's per-model preparation: shard/wrap ``model`` for training (``is_training``; build
        its optimizer after with :meth:`create_optimizer`) or for inference (frozen, eval mode).
        ``shard_size`` (-1: ``config.shard_size``) and ``reshard_after_forward`` are FSDP2's; on a backend
        that does not shard, any value other than the defaults is refused. A model built under
        :meth:`init_model_context` with ``meta_init=True`` is materialized first. Non-modules and
        engines pass through."""
        if not isinstance(model, nn.Module) or is_engine(model):
            return model
        self._check_sharding_args(shard_size, reshard_after_forward)
        prepared = self.prepare(model)
        if is_training:
            self._make_trainable(prepared)
        return prepared

    def _check_sharding_args(self, shard_size: Any, reshard_after_forward: bool) -> None:
        if shard_size != -1 or reshard_after_forward is not True:
            raise ValueError(f"{type(self).__name__}.prepare_model: shard_size={shard_size!r}, reshard_after_forward="
                             f"{reshard_after_forward!r} are FSDP2 settings and this strategy does not shard; accepted: "
                             "shard_size=-1, reshard_after_forward=True (or LightRFTFSDP)")

    def _make_trainable(self, model: nn.Module) -> None:
        """Make a model prepared for inference trainable again (``prepare_model(..., is_training=True)``)."""
        inner = self._inner(model)
        key = id(self._unwrapped(inner))
        flags = self._frozen_requires_grad.get(key)
        if flags is not None:
            target = self._unwrapped(inner)
            for name, param in target.named_parameters():
                param.requires_grad_(flags.get(name, True))
            target.train()

    @contextlib.contextmanager
    def init_model_context(self, meta_init: bool = False) -> Iterator[None]:
        """Build models inside this context. ``meta_init=True`` creates their parameters on the meta
        device (no memory; buffers stay real), and :meth:`prepare` / :meth:`prepare_model` materialize
        them on the device with the weights the same construction without meta init gives (it is
        replayed, see :func:`materialize_meta`), identically on every rank that built them with the
        same seed; load weights after as LightRFT does (``load_model``, ``load_ckpt``) or train from them."""
        if not meta_init:
            yield
            return
        with parameters_on_meta():
            yield

    def _materialize(self, model: nn.Module) -> nn.Module:
        """Give a model built under ``init_model_context(meta_init=True)`` real, initialized parameters
        (on CPU: the backend moves or shards them next)."""
        if isinstance(model, nn.Module) and has_meta(model):
            materialize_meta(model, torch.device("cpu"), self.config.seed)
        return model

    def prepare_models_and_optimizers(self, actor: Any, critic: Any, reward_models: Any, initial_model: Any,
                                      args: Any = None, max_steps: int = int(1e8)) -> tuple[Any, Any, Any, Any]:
        """LightRFT's set-up of an RLHF run: the actor and the critic (if not None) for training, each
        with AdamW (``actor_learning_rate`` / ``critic_learning_rate``, ``adam_betas``, ``l2``) and
        LightRFT's schedule (cosine to 0.1 x lr after a linear warmup of ``ceil(max_steps x
        lr_warmup_ratio)`` steps), the reward models (one, a list, or None) and the initial (reference)
        model for inference. ``args`` (default: the strategy's config) gives those values. An actor that
        wraps its Hugging Face model in ``.model`` gets ``is_actor = True``. Returns ``((actor, optimizer,
        scheduler), (critic, optimizer, scheduler), reward_models, initial_model)``."""
        config = self._args_config(args)
        if isinstance(getattr(actor, "model", None), nn.Module) and not _is_hf_model(actor):
            actor.is_actor = True
        actor_out = self._prepare_trained(actor, config.actor_learning_rate, config, max_steps)
        critic_out = (None, None, None) if critic is None else self._prepare_trained(
            critic, config.critic_learning_rate, config, max_steps)
        rms = self.prepare(reward_models) if reward_models is not None else None
        ref = self.prepare(initial_model) if initial_model is not None else None
        self.sync_and_clear_cache()
        return actor_out, critic_out, rms, ref

    def prepare_reward_model(self, reward_model: nn.Module, args: Any = None,
                             max_steps: int = int(1e8)) -> tuple[Any, Any, Any]:
        """A reward model to train: ``(model, optimizer, scheduler)`` prepared as the actor is in
        :meth:`prepare_models_and_optimizers` (``actor_learning_rate``, LightRFT's schedule)."""
        config = self._args_config(args)
        out = self._prepare_trained(reward_model, config.actor_learning_rate, config, max_steps)
        self.sync_and_clear_cache()
        return out

    def _prepare_trained(self, model: nn.Module, lr: float, config: StrategyConfig, max_steps: int) -> tuple[Any, Any, Any]:
        optimizer = self.create_optimizer(model, lr=lr, betas=config.adam_betas, weight_decay=config.l2)
        scheduler = lightrft_scheduler(optimizer, max_steps, config.lr_warmup_ratio)
        prepared, optimizer, scheduler = self.prepare((model, optimizer, scheduler))
        return prepared, optimizer, scheduler

    def setup_dataloader(self, replay_buffer: Any, batch_size: int, pin_memory: bool = False, shuffle: bool = True,
                         collate_fn: Optional[Callable] = None, drop_last: bool = True, sampler: Any = None,
                         consumed_samples: int = 0) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` over ``replay_buffer`` (any dataset) whose sampler gives each rank its part
        (every process, as LightRFT's: with ``sp_size > 1`` its trainers gather an sp group's parts with
        ``sp_data_processor.preprocess``; shuffled with the config's seed) and skips the ``consumed_samples`` already seen over all ranks,
        so a resumed run continues where it stopped (``sampler.set_epoch(epoch)`` starts the next epoch
        from its beginning). ``sampler`` replaces that sampler."""
        if consumed_samples < 0:
            raise ValueError(f"setup_dataloader: consumed_samples={consumed_samples!r}; accepted: an integer >= 0")
        if sampler is None:
            sampler = ResumableDistributedSampler(replay_buffer, num_replicas=self.world_size, rank=self.get_rank(),
                                                  shuffle=shuffle, seed=self.config.seed, drop_last=drop_last,
                                                  consumed_samples=consumed_samples)
        elif consumed_samples:
            raise ValueError("setup_dataloader: consumed_samples needs the strategy's sampler; accepted: sampler=None, "
                             "or consumed_samples=0 with your own sampler")
        return torch.utils.data.DataLoader(replay_buffer, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                           collate_fn=collate_fn, pin_memory=pin_memory)

    def offload_model(self, models: Any, empty_cache: bool = True) -> int:
        """Move the weights and buffers of ``models`` (a module or a list) to CPU memory, freeing
        accelerator memory. Returns the bytes moved. On a CPU strategy the weights already are in CPU
        memory: nothing moves and 0 is returned (the post-condition holds)."""
        moved = 0
        for model in _as_list(models):
            module = self.unwrap_model(model)
            device = _module_device(module)
            if device is None:
                continue
            self._offloaded.setdefault(id(module), device)
            moved += self._move_model(module, torch.device("cpu"))
        if empty_cache:
            self.sync_and_clear_cache()
        return moved

    def reload_model(self, models: Any) -> int:
        """Move ``models`` back where :meth:`offload_model` took them from (default: the root device).
        Returns the bytes moved."""
        moved = 0
        for model in _as_list(models):
            module = self.unwrap_model(model)
            device = self._offloaded.pop(id(module), self._accelerator_device())
            moved += self._move_model(module, device)
        return moved

    def _move_model(self, module: nn.Module, device: torch.device) -> int:
        """Backend hook: move a model's weights and buffers to ``device``; returns the bytes moved."""
        return _move_module(module, device)

    def maybe_offload_optimizer(self, optimizer: Any) -> Any:
        """Move the optimizer's state (Adam moments, ...) to CPU memory; returns the optimizer.
        :attr:`last_moved_bytes` tells how many bytes moved (0 on CPU, or where the state is already
        in CPU memory, e.g. ``adam_offload`` under DeepSpeed)."""
        self.last_moved_bytes = _move_optimizer_state(self._torch_optimizer(optimizer), torch.device("cpu"))
        return optimizer

    def maybe_load_optimizer(self, optimizer: Any, device: Any = None) -> Any:
        """Move the optimizer's state back to ``device`` (default: where its parameters are)."""
        opt = self._torch_optimizer(optimizer)
        if device is None:
            params = [p for group in opt.param_groups for p in group["params"]]
            device = _local(params[0]).device if params else self._accelerator_device()
        self.last_moved_bytes = _move_optimizer_state(opt, torch.device(device))
        return optimizer

    last_moved_bytes: int = 0

    def _torch_optimizer(self, optimizer: Any) -> Optimizer:
        """The torch optimizer that holds the state (backends unwrap their own wrappers)."""

        return unwrap_optimizer(optimizer)

    @torch.no_grad()
    def moving_average(self, model: nn.Module, model_ema: nn.Module, beta: float = 0.992, device: Any = "cpu") -> bool:
        """LightRFT's EMA: every ``accumulated_gradient``-th call (once per optimizer step, as the
        trainers call it per micro-step), ``ema = beta * ema + (1 - beta) * param`` for each trainable
        parameter, on the full (gathered) weights. Returns whether it updated."""
        if not 0 <= beta <= 1:
            raise ValueError(f"moving_average: beta={beta!r}; accepted: a number in [0, 1]")
        self.time_steps["ema"] = self.time_steps.get("ema", 0) + 1
        if self.time_steps["ema"] % self.accumulation_steps:
            return False
        src = dict(self.unwrap_model(model).named_parameters())
        for name, ema_param in self.unwrap_model(model_ema).named_parameters():
            param = src.get(name)
            if param is None or not param.requires_grad:
                continue
            self._ema_update(param, ema_param, beta)
        return True

    def _ema_update(self, param: torch.Tensor, ema_param: torch.Tensor, beta: float) -> None:
        """Backend hook: one EMA update (FSDP and DeepSpeed gather what is sharded)."""
        from torch.distributed.tensor import DTensor

        if isinstance(param, DTensor) and isinstance(ema_param, DTensor) and param.placements == ema_param.placements:
            ema_param.to_local().mul_(beta).add_(param.to_local().to(ema_param.dtype), alpha=1 - beta)
            return
        full = param.full_tensor() if isinstance(param, DTensor) else param
        if isinstance(ema_param, DTensor):
            local = ema_param.to_local()
            shard = torch.distributed.tensor.distribute_tensor(full.detach().to(local.device), ema_param.device_mesh,
                                                              ema_param.placements).to_local()
            local.mul_(beta).add_(shard.to(local.dtype), alpha=1 - beta)
            return
        ema_param.data.mul_(beta).add_(full.detach().to(ema_param.device, ema_param.dtype), alpha=1 - beta)

    def load_model(self, model: nn.Module, path: str, map_location: Any = "cpu", strict: bool = False,
                   key_replace_fn: Optional[Callable[[dict], dict]] = None) -> tuple[list[str], list[str]]:
        """Load a plain state dict file (``torch.save``, read with ``weights_only=True``, or safetensors)
        into ``model`` (sharded or partitioned ones included); ``key_replace_fn(state_dict)`` may rename
        keys first. Returns ``(missing_keys, unexpected_keys)``; ``strict`` raises on either."""
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
        if key_replace_fn is not None:
            state = key_replace_fn(state)
        module = self.unwrap_model(model)
        expected = set(module.state_dict().keys())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if strict and (missing or unexpected):
            raise RuntimeError(f"load_model({path}): missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
        self._load_full_state(module, {k: v for k, v in state.items() if k in expected})
        return missing, unexpected

    def _load_full_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Backend hook: copy full tensors into ``module``'s (possibly sharded) weights."""
        module.load_state_dict(state, strict=False)


def _as_list(models: Any) -> list[Any]:
    if models is None:
        return []
    return [m for m in models if m is not None] if isinstance(models, (list, tuple)) else [models]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _module_device(module: nn.Module) -> Optional[torch.device]:
    for t in list(module.parameters()) + list(module.buffers()):
        return _local(t).device
    return None


def _move_module(module: nn.Module, device: torch.device) -> int:
    """Move every parameter's and buffer's storage to ``device`` in place (``.data`` swap, so optimizers,
    FSDP2's sharded DTensors and tied weights keep their objects); returns the bytes that moved."""
    moved, seen = 0, set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        local = _local(t)
        if local.device == device or local.is_meta:
            continue
        moved += local.numel() * local.element_size()
        local.data = local.data.to(device, non_blocking=False)
    return moved


def _move_optimizer_state(optimizer: Any, device: torch.device) -> int:
    moved = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or key == "step":
                continue
            local = _local(value)
            if local.device == device:
                continue
            moved += local.numel() * local.element_size()
            local.data = local.data.to(device)
    return moved


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _is_hf_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def lightrft_scheduler(optimizer: Optimizer, max_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.1) -> Any:
    """LightRFT's schedule: linear warmup over ``ceil(max_steps x warmup_ratio)`` steps, then a cosine
    decay to ``min_lr_ratio`` x each group's learning rate at ``max_steps``."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    max_steps = int(max_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, math.ceil(max_steps * warmup_ratio), max_steps,
                                                       min_lr_rate=min_lr_ratio)


class ResumableDistributedSampler(torch.utils.data.DistributedSampler):
    """``DistributedSampler`` that skips the first ``consumed_samples`` samples (counted over all ranks)
    of the current epoch, as LightRFT's does; ``set_epoch(epoch, consumed_samples=0)`` starts an epoch."""

    def __init__(self, dataset: Any, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, consumed_samples: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.consumed_indices = consumed_samples // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.consumed_indices:])

    def __len__(self) -> int:
        return max(self.num_samples - self.consumed_indices, 0)

    def set_epoch(self, epoch: int, consumed_samples: int = 0) -> None:
        super().set_epoch(epoch)
        self.consumed_indices = consumed_samples // self.num_replicas
