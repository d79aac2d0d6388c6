"""`LightRFTFSDP`: the LightRFT API on FSDP2 (``fully_shard``), sharding every model itself, on CUDA
(nccl) and CPU (gloo)."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightrft_lightning import checkpoint, lightning_api, process_group
from lightrft_lightning.parallel import fsdp2, ulysses
from lightrft_lightning.parallel.meta_init import has_meta, materialize_meta
from lightrft_lightning.config import StrategyConfig
from lightrft_lightning.lora import frozen_base_keys
from lightrft_lightning.lightning_api import unwrap_optimizer
from lightrft_lightning.strategies.base import TRAIN_STATES, StrategyBase, lightrft_config

class LightRFTFSDP(StrategyBase, ModelParallelStrategy):
    """FSDP2 strategy with the LightRFT API; registered with Lightning as ``"lightrft_fsdp"``.

    Every model is sharded on its own: ``fully_shard`` on each transformer block (the classes named
    in a Hugging Face model's ``_no_split_modules``, or ``wrap_classes``), then on the model. Under a
    ``Trainer`` each child module of the ``LightningModule`` that holds parameters is such a model,
    unless ``configure_model`` already applied ``fully_shard``.

    Precision: under a ``Trainer`` its ``precision`` ("32-true", "bf16-mixed", "bf16-true",
    "16-mixed") picks the ``MixedPrecisionPolicy`` (a config whose ``bf16``/``fp16`` were given must
    agree); standalone, ``StrategyConfig.bf16``/``fp16`` do.
    Gradients are always reduced in fp32. ``StrategyConfig.shard_size`` shards inside groups of that
    many ranks and replicates across groups (HSDP); ``fsdp_cpu_offload`` keeps parameters, gradients
    and optimizer state in CPU memory.

    Args:
        config: a ``StrategyConfig`` or anything ``StrategyConfig.from_args`` reads.
        wrap_classes: module classes (or class names) to shard one by one, instead of ``_no_split_modules``.
        accelerator, parallel_devices, cluster_environment, precision_plugin, process_group_backend:
            as in Lightning's strategies (the ``Trainer`` fills them in).
        timeout: process group timeout; defaults to ``StrategyConfig.dist_timeout_minutes``.
        seed, max_norm, micro_train_batch_size, train_batch_size, bf16, args: LightRFT's constructor
            (``FSDPV2Strategy(seed=42, max_norm=1.0, ..., bf16=True, args=args)``, keywords); the values
            given override those of ``args``.
    """

    strategy_name = "lightrft_fsdp"

    def __init__(
        self,
        config: Union[StrategyConfig, Any, None] = None,
        wrap_classes: Optional[Sequence[Union[type, str]]] = None,
        accelerator: Any = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Any = None,
        precision_plugin: Any = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = None,
        *,
        seed: Optional[int] = None,
        max_norm: Optional[float] = None,
        micro_train_batch_size: Optional[int] = None,
        train_batch_size: Optional[int] = None,
        bf16: Optional[bool] = None,
        args: Any = None,
    ) -> None:
        cfg = lightrft_config(type(self).__name__, config, args, {
            "seed": seed, "max_norm": max_norm, "micro_train_batch_size": micro_train_batch_size,
            "train_batch_size": train_batch_size, "bf16": bf16})
        StrategyBase.__init__(self, cfg)
        ModelParallelStrategy.__init__(
            self,
            process_group_backend=process_group_backend,
            timeout=timeout or timedelta(minutes=self.config.dist_timeout_minutes),
        )
        self.accelerator = accelerator
        self.parallel_devices = parallel_devices
        self.cluster_environment = cluster_environment
        self.precision_plugin = precision_plugin  # type: ignore[assignment]
        self._wrap_classes = list(wrap_classes or [])
        self._meshes: dict[int, DeviceMesh] = {}

    @property
    def bf16(self) -> bool:
        """``config.bf16`` (LightRFT's attribute)."""
        return self.config.bf16

    # ------------------------------------------------------------------ process group and mesh
    def setup_distributed(self, timeout: Optional[timedelta] = None, num_gpu_per_node: Optional[int] = None) -> None:
        """Seed every RNG, join the process group (``cpu:gloo,cuda:nccl`` on CUDA, gloo on CPU) and build the mesh and the
        engine groups."""
        self._check_shard_size(int(os.environ.get("WORLD_SIZE", 1)))
        ulysses.check_sp_size(int(os.environ.get("WORLD_SIZE", 1)), self.config.sp_size)
        super().setup_distributed(timeout)
        lightning_api.set_strategy_device_mesh(self, self._build_mesh())
        self._setup_sequence_parallel(self.root_device.type)
        if self._engine_mp_group is None:
            self._create_engine_groups()

    def setup_environment(self) -> None:
        self._check_shard_size(self.num_nodes * self.num_processes)
        ulysses.check_sp_size(self.num_nodes * self.num_processes, self.config.sp_size)
        self._default_process_group_backend()
        lightning_api.join_process_group(self)
        lightning_api.set_strategy_device_mesh(self, self._build_mesh())
        self._setup_sequence_parallel(self.root_device.type)
        self._create_engine_groups()
        assert self.lightning_module is not None
        lightning_api.share_device_mesh(self.lightning_module, self.device_mesh)

    def _check_shard_size(self, world_size: int, size: Optional[int] = None, name: str = "StrategyConfig.shard_size") -> None:
        fsdp2.check_shard_size(world_size, self.config.shard_size if size is None else size, name)

    def prepare_model(self, model: Any, is_training: bool = False, shard_size: Union[int, str] = -1,
                      reshard_after_forward: bool = True) -> Any:
        """LightRFT's ``prepare_model``: shard ``model`` (an ``is_actor`` wrapper's ``.model``) with
        ``shard_size`` ranks per shard group (-1: ``config.shard_size``, else all ranks) and FSDP2's
        ``reshard_after_forward``, for training (``is_training``: build the optimizer after with
        ``create_optimizer``) or inference (frozen, eval mode). Meta-initialized models are materialized
        first. LightRFT's ``shard_size="auto"`` is not supported (an error says so)."""
        if not isinstance(model, nn.Module) or hasattr(model, "wake_up"):
            return model
        if shard_size == "auto" or not (shard_size == -1 or (isinstance(shard_size, int) and shard_size >= 1)):
            raise ValueError(f"LightRFTFSDP.prepare_model: shard_size={shard_size!r}; accepted: -1 (config.shard_size) "
                             "or a divisor of the world size")
        self._prepare_sharding = (None if shard_size == -1 else shard_size, reshard_after_forward)
        try:
            prepared = self.prepare(model)
        finally:
            self._prepare_sharding = (None, True)
        if is_training:
            self._make_trainable(prepared)
        return prepared

    _prepare_sharding: tuple[Optional[int], bool] = (None, True)

    def _move_model(self, module: nn.Module, device: torch.device) -> int:
        """FSDP2 moves its sharded parameters with ``module.to`` (it re-registers the shards)."""
        if not isinstance(module, FSDPModule):
            return super()._move_model(module, device)
        moved = 0
        for t in list(module.parameters()) + list(module.buffers()):
            local = t.to_local() if isinstance(t, DTensor) else t
            if local.device != device:
                moved += local.numel() * local.element_size()
        if moved:
            module.to(device)
        return moved

    def _load_full_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if not any(isinstance(p, DTensor) for p in module.parameters()):
            return super()._load_full_state(module, state)
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def _build_mesh(self, shard_size: Optional[int] = None) -> DeviceMesh:
        if not dist.is_initialized():  # one process without a process group: FSDP2 still wants a mesh
            backend = process_group.default_backend(self.root_device.type)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return fsdp2.build_mesh(self.root_device.type, dist.get_world_size(), shard_size or self.config.shard_size)

    @property
    def root_device(self) -> torch.device:
        if self.parallel_devices is not None:
            return self.parallel_devices[self.local_rank]
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def local_rank(self) -> int:
        if self.cluster_environment is not None:
            return self.cluster_environment.local_rank()
        return self.config.device_index()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # the ranks of one sp group read the same prompts
        return {"num_replicas": self.dp_world_size, "rank": self.dp_rank}

    # ------------------------------------------------------------------ sharding
    @property
    def mp_policy(self) -> MixedPrecisionPolicy:
        """The ``MixedPrecisionPolicy`` every model is sharded with."""
        trained = self.training_precision()
        plugin = lightning_api.given_precision_plugin(self)
        if plugin is not None:  # the Trainer's, with its exact flag (bf16-true...)
            precision = str(plugin.precision)
        else:
            precision = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}[trained]
        return fsdp2.mixed_precision_policy(precision, type(self).__name__)

    def shard(self, model: nn.Module, shard_size: Optional[int] = None, reshard_after_forward: bool = True) -> nn.Module:
        """``fully_shard`` each transformer block of ``model`` (bottom-up), then ``model`` itself
        (:func:`~lightrft_lightning.parallel.fsdp2.apply_fsdp`); a model that is already sharded is returned
        unchanged. ``shard_size`` (default ``config.shard_size``) shards within groups of that many ranks
        (HSDP); ``reshard_after_forward`` is FSDP2's (False keeps the gathered weights between forward and
        backward)."""
        if lightning_api.strategy_device_mesh(self) is None:
            raise RuntimeError(f"{type(self).__name__}: call setup_distributed() before prepare() (a Trainer does it)")
        mesh = self.device_mesh
        if shard_size is not None:
            self._check_shard_size(dist.get_world_size(), shard_size, "prepare_model: shard_size")
            if shard_size not in self._meshes:
                self._meshes[shard_size] = self._build_mesh(shard_size)
            mesh = self._meshes[shard_size]
        return fsdp2.apply_fsdp(model, mesh, self.mp_policy, fsdp2.block_classes(model, self._wrap_classes, type(self).__name__),
                                cpu_offload=self.config.fsdp_cpu_offload, reshard_after_forward=reshard_after_forward)

    def _prepare_model(self, model: nn.Module, optimizer: Optional[Optimizer], train: bool) -> tuple[nn.Module, Any]:
        shard_size, reshard = self._prepare_sharding
        if optimizer is None:
            return self.shard(model, shard_size, reshard), None
        opt = unwrap_optimizer(optimizer)
        if opt.state:
            raise ValueError("LightRFTFSDP.prepare: the optimizer has already stepped; prepare the model before "
                             "training so its state can be sharded with the parameters")
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.shard(model, shard_size, reshard)
        params = dict(model.named_parameters(remove_duplicate=False))
        for group in opt.param_groups:  # rebind in place: schedulers keep pointing at this optimizer
            group["params"] = [params[names[id(p)]] for p in group["params"]]
        return model, optimizer

    # ------------------------------------------------------------------ training step hooks
    def _no_gradient_sync(self, model: nn.Module, boundary: bool) -> AbstractContextManager:
        # Every micro-step reduce-scatters its gradients, so each rank only ever holds its shard of them
        # (turning the sync off would keep a full unsharded fp32 gradient per rank until the boundary, as
        # torchtitan notes); with HSDP only the all-reduce across replicas waits for the boundary.
        if boundary or not isinstance(model, FSDPModule):
            return nullcontext()
        return _without_replica_all_reduce(model)

    def _clip_grad_norm(self, model: nn.Module, optimizer: Optimizer, max_norm: float) -> torch.Tensor:
        norm = super()._clip_grad_norm(model, optimizer, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    # ------------------------------------------------------------------ full weights (export, weight sync)
    def iter_full_params(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, full tensor)`` for every entry of ``model.state_dict()``, gathering one
        parameter at a time. A collective: every rank must consume the whole iterator."""
        for name, tensor in model.state_dict().items():
            yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The unsharded state dict of ``model`` on CPU, on rank 0 (empty on the other ranks)."""
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # ------------------------------------------------------------------ Lightning integration
    def _lightning_setup(self, trainer: Any) -> None:
        # ModelParallelStrategy.setup requires configure_model to shard the module; this strategy shards
        # what configure_model left (_setup_model), so it runs the setup every Lightning strategy shares
        super(ModelParallelStrategy, self).setup(trainer)

    def model_to_device(self) -> None:
        # unsharded, the whole module would land on every device: _setup_model shards it first
        if self._sharded(self.model) and not self.config.fsdp_cpu_offload:
            super().model_to_device()

    def _materialize_lightning_module(self) -> None:
        # a pretrained actor built on the meta device (and its reference, PPO's critic) stays there until it
        # is sharded: _setup_model loads each rank's rows of the checkpoint
        module = self.lightning_module
        if module is not None and has_meta(module):
            materialize_meta(module, torch.device("cpu"), self.config.seed,
                             leave_pretrained=fsdp2.reads_pretrained_shards())

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Shard each child of the ``LightningModule`` that has parameters (unless ``configure_model`` did),
        load the checkpoint's rows into the pretrained ones left on the meta device, then move what sharding
        left (frozen children without parameters, buffers) to the device."""
        sharded = self._sharded(model)
        if not sharded:
            self._shard_lightning_module(model)
        device = torch.device("cpu") if self.config.fsdp_cpu_offload else self.root_device
        for child in model.children():
            if has_meta(child):
                if self._sharded(child):
                    fsdp2.load_pretrained_shards(child, device)
                else:
                    self._materialize(child)
        if not sharded:
            self.model_to_device()
        return model

    @staticmethod
    def _sharded(model: Optional[nn.Module]) -> bool:
        return model is not None and any(isinstance(m, FSDPModule) for m in model.modules())

    def _shard_lightning_module(self, module: nn.Module) -> None:
        for child in module.children():
            if any(True for _ in child.parameters()):
                self.shard(child)
        if any(True for _ in module.parameters(recurse=False)):
            fsdp2.apply_fsdp(module, self.device_mesh, self.mp_policy, (), cpu_offload=self.config.fsdp_cpu_offload)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.model is not None
        return get_model_state_dict(self.model)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        assert self.model is not None
        return get_optimizer_state_dict(self.model, unwrap_optimizer(optimizer))

    def save_checkpoint(self, checkpoint_dict: dict[str, Any], filepath: Any,
                        storage_options: Optional[checkpoint.Publish] = None) -> checkpoint.SaveHandle:
        """Write a Lightning checkpoint as a DCP directory ``filepath`` (model and optimizers sharded,
        the rest and the step counters in its ``extra_state.pt``) through the checkpoint writer;
        ``storage_options`` may be a :class:`~lightrft_lightning.checkpoint.Publish`."""
        options = checkpoint.Publish.of(storage_options, type(self).__name__)
        path = Path(self.broadcast(str(filepath)))
        checkpoint_dict[TRAIN_STATES] = self.train_states_dict()
        dcp_state = {"state_dict": checkpoint_dict.pop("state_dict")}
        for idx, state in enumerate(checkpoint_dict.pop("optimizer_states", [])):
            dcp_state[f"optimizer_{idx}"] = state
        return checkpoint.write_checkpoint(
            path, lambda tmp: checkpoint.write_dcp(tmp, dcp_state, checkpoint_dict, async_save=options.async_save,
                                                   is_rank_0=self.is_global_zero),
            options, is_rank_0=self.is_global_zero, barrier=self.barrier)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load a checkpoint written by :meth:`save_checkpoint` into the sharded model and optimizers
        (with any world size) and return the rest of it."""
        assert self.model is not None
        path = str(self.broadcast(str(checkpoint_path)))
        optimizers = [unwrap_optimizer(o) for o in self.optimizers]
        model_state = get_model_state_dict(self.model)
        frozen = frozen_base_keys(self.model)  # LoRA bases: rebuilt from their model, not in checkpoints
        template: dict[str, Any] = {"state_dict": {k: v for k, v in model_state.items() if k not in frozen}}
        for idx, opt in enumerate(optimizers):
            template[f"optimizer_{idx}"] = get_optimizer_state_dict(self.model, opt)
        extra = checkpoint.load(path, template)
        model_state.update(template["state_dict"])
        strict = self.lightning_module.strict_loading if self.lightning_module is not None else True
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=strict))
        for idx, opt in enumerate(optimizers):
            set_optimizer_state_dict(self.model, opt, template[f"optimizer_{idx}"])
        self.load_train_states_dict(extra.pop(TRAIN_STATES, {}))
        return extra

FSDPV2Strategy = LightRFTFSDP  # LightRFT's name


@contextmanager
def _without_replica_all_reduce(model: FSDPModule) -> Iterator[None]:
    model.set_requires_all_reduce(False)
    try:
        yield
    finally:
        model.set_requires_all_reduce(True)
