"""`LightRFTDeepSpeed`: DeepSpeed ZeRO-0/1/2/3 with the LightRFT API, on CPU (gloo) and CUDA (nccl),
with one DeepSpeed engine per model (actor and critic train, ref and reward models infer).

Lightning's ``DeepSpeedStrategy`` refuses CPU and wraps the whole ``LightningModule`` in one engine.
This one builds a training engine for each child module that an optimizer trains (``self.actor``,
``self.critic``) and an inference engine for each frozen child (``self.ref``: ZeRO-3 partitioned, or
stage 0 since ZeRO-1/2 engines need an optimizer). The children stay the user's modules (same type,
same parameter names, same ``state_dict`` keys); the strategy holds the engines and routes each
child's ``forward`` through its engine. A call with a stepper goes to the engine of the stepper's model,
``optimizer.step()`` to the engine of that optimizer (a map built at setup), and a plain
``manual_backward(loss)`` to the only training engine, or to the one whose forward ran since its last backward.

Accumulation scaling, gradient clipping, non-finite step skipping and (standalone) the scheduler
step happen inside ``engine.backward``/``engine.step``, as DeepSpeed does them. The clipping norm
follows the call shape: ``StrategyConfig.max_norm`` with a stepper (LightRFT's semantics), and for
Lightning's shape only what ``Trainer(gradient_clip_val=...)`` or ``self.clip_gradients(...)`` asks for.

The engine handles and the routing of forwards and losses to them are in ``deepspeed_engines.py``, the
checkpoints in ``deepspeed_checkpointing.py`` and the full weights and LightRFT's model helpers in
``deepspeed_weights.py`` (mixins of :class:`LightRFTDeepSpeed`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import reset_seed, seed_everything
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, Precision
from lightning.pytorch.strategies.deepspeed import DeepSpeedStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn
from torch.optim import Optimizer

from lightrft_lightning import lightning_api, process_group
from lightrft_lightning.lightning_api import unwrap_optimizer
from lightrft_lightning.parallel import deepspeed as parallel_deepspeed
from lightrft_lightning.parallel import ulysses
from lightrft_lightning.parallel.meta_init import has_meta, materialize_meta
from lightrft_lightning.parallel.stepper import Stepper
from lightrft_lightning.strategies.base import StrategyBase, lightrft_config
from lightrft_lightning.strategies.deepspeed_checkpointing import DeepSpeedCheckpointMixin
from lightrft_lightning.strategies.deepspeed_engines import (DeepSpeedModel, handle_for_loss, handle_for_optimizer,
                                                            optimizer_children, route_forward)
from lightrft_lightning.strategies.deepspeed_weights import DeepSpeedWeightsMixin

log = logging.getLogger(__name__)

_INSTALL_HINT = "install the `deepspeed` extra: pip install 'lightrft-lightning[deepspeed]'"


class EngineClippingPrecision(DeepSpeedPrecision):
    """``DeepSpeedPrecision`` for several engines: a ``clip_gradients`` request (from
    ``Trainer(gradient_clip_val=...)`` or ``LightningModule.clip_gradients``) sets the norm that the
    engine clips to inside its next ``step`` (DeepSpeed clips the partitioned gradients itself)."""

    def __init__(self, precision: str) -> None:
        super().__init__(precision)  # type: ignore[arg-type]
        self.requested_max_norm = 0.0

    def clip_gradients(self, optimizer: Any, clip_val: Union[int, float] = 0.0,
                       gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM) -> None:
        if clip_val > 0 and gradient_clip_algorithm != GradClipAlgorithmType.NORM:
            raise ValueError(f"LightRFTDeepSpeed: gradient_clip_algorithm={str(gradient_clip_algorithm.value)!r} is "
                             "not supported (DeepSpeed clips by norm); accepted: 'norm'")
        self.requested_max_norm = float(clip_val)

    def take_requested_max_norm(self) -> float:
        """The norm asked for since the last step (0: no clipping), and forget it."""
        value, self.requested_max_norm = self.requested_max_norm, 0.0
        return value


class LightRFTDeepSpeed(DeepSpeedCheckpointMixin, DeepSpeedWeightsMixin, StrategyBase, DeepSpeedStrategy):
    """DeepSpeed ZeRO with the LightRFT API and several engines, usable standalone or in a ``Trainer``.

    Args:
        config: a ``StrategyConfig`` or anything ``StrategyConfig.from_args`` reads. ``None`` (as when
            the strategy is built by name) keeps LightRFT's defaults but lets the Trainer's
            ``accumulate_grad_batches`` decide accumulation. Under a ``Trainer`` its ``precision``
            decides, as for every strategy; a config whose ``bf16``/``fp16`` disagree is refused.
        ds_config: a DeepSpeed config dict or JSON path merged over the one built from ``config``
            (its values win).
        **lightning_kwargs: ``DeepSpeedStrategy`` arguments for the process group and devices
            (``accelerator``, ``parallel_devices``, ``cluster_environment``, ``process_group_backend``,
            ``timeout``...); ``stage`` sets ``zero_stage``.
        seed, max_norm, micro_train_batch_size, train_batch_size, zero_stage, bf16, args: LightRFT's
            constructor (``DeepspeedStrategy(seed=42, ..., zero_stage=2, bf16=True, args=args)``,
            keywords); the values given override those of ``args``.
    """

    strategy_name = "lightrft_deepspeed"

    def __init__(self, config: Any = None, ds_config: Union[dict, str, Path, None] = None, *,
                 seed: Optional[int] = None, max_norm: Optional[float] = None,
                 micro_train_batch_size: Optional[int] = None, train_batch_size: Optional[int] = None,
                 zero_stage: Optional[int] = None, bf16: Optional[bool] = None, args: Any = None,
                 **lightning_kwargs: Any) -> None:
        if not lightning_api.DEEPSPEED_AVAILABLE:
            raise ImportError(f"LightRFTDeepSpeed needs DeepSpeed, which is not installed; {_INSTALL_HINT}")
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        stage = lightning_kwargs.pop("stage", None)
        values = {"seed": seed, "max_norm": max_norm, "micro_train_batch_size": micro_train_batch_size,
                  "train_batch_size": train_batch_size, "zero_stage": zero_stage, "bf16": bf16}
        self._follow_trainer = config is None and args is None and all(
            v is None for v in values.values())
        config = lightrft_config(type(self).__name__, config, args, values)
        DeepSpeedStrategy.__init__(self, config={}, **lightning_kwargs)
        StrategyBase.__init__(self, config)  # `self.config` is the StrategyConfig from here on
        if stage is not None:
            self.config = dataclasses.replace(self.config, zero_stage=stage)  # validated again
        self.user_ds_config = parallel_deepspeed.load_user_config(ds_config)
        self._handles: list[tuple[str, DeepSpeedModel]] = []
        # training engines whose forward ran with gradients since their backward -> that forward's output nodes
        self._forwarded: dict[DeepSpeedModel, set[Any]] = {}

    @property
    def precision_plugin(self) -> Precision:
        return DeepSpeedStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin: Optional[Precision]) -> None:
        # the Trainer hands every DeepSpeedStrategy a DeepSpeedPrecision; ours also records clipping requests
        if type(plugin) is DeepSpeedPrecision:
            plugin = EngineClippingPrecision(plugin.precision)
        DeepSpeedStrategy.precision_plugin.fset(self, plugin)

    # ------------------------------------------------------------------ DeepSpeed config
    @property
    def accumulation_steps(self) -> int:
        if self._follow_trainer and self.lightning_module is not None:
            return self.lightning_module.trainer.accumulate_grad_batches
        return super().accumulation_steps

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # the ranks of one sp group read the same prompts
        return {"num_replicas": self.dp_world_size, "rank": self.dp_rank}

    def ds_config(self, train: bool = True) -> dict[str, Any]:
        """The DeepSpeed config of a training engine (``train``) or an inference engine."""
        return parallel_deepspeed.build_config(self.config, self.training_precision(), self.accumulation_steps,
                                               self.user_ds_config, train=train)

    @property
    def bf16(self) -> bool:
        """``config.bf16`` (LightRFT's attribute)."""
        return self.config.bf16

    @property
    def stage(self) -> int:
        """The ZeRO stage (LightRFT's attribute; = :attr:`zero_stage`)."""
        return self.zero_stage

    # LightRFT's attribute; `prepare(..., is_rlhf=True)` changes nothing here (see README)
    is_rlhf = False

    def get_ds_train_config(self, is_actor: bool = False) -> dict[str, Any]:
        """The DeepSpeed config of a training engine (LightRFT's name; ``is_actor`` changes nothing: no
        pretraining-data batch doubling)."""
        return self.ds_config(train=True)

    def get_ds_eval_config(self, offload: bool = False) -> dict[str, Any]:
        """The DeepSpeed config of an inference engine (ZeRO-3 if training uses it, else stage 0);
        ``offload=True`` keeps its parameters in CPU memory (ZeRO-3 only)."""
        cfg = self.ds_config(train=False)
        if offload:
            if cfg["zero_optimization"]["stage"] != 3:
                raise ValueError("get_ds_eval_config(offload=True) needs ZeRO-3 (StrategyConfig.zero_stage=3); "
                                 f"accepted: offload=False at zero_stage={self.zero_stage}")
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        return cfg

    @property
    def zero_stage(self) -> int:
        return int(self.user_ds_config.get("zero_optimization", {}).get("stage", self.config.zero_stage))

    @property
    def zero_stage_3(self) -> bool:
        return self.zero_stage == 3

    # ------------------------------------------------------------------ process group
    def setup_distributed(self, timeout: Optional[timedelta] = None) -> None:
        """Seed every RNG and join the process group through ``deepspeed.init_distributed`` (gloo on
        CPU, ``cpu:gloo,cuda:nccl`` on CUDA). Under a Trainer, Lightning's cluster environment gives the ranks."""
        if self.cluster_environment is not None:  # called by Lightning's setup_environment
            ulysses.check_sp_size(self.num_nodes * self.num_processes, self.config.sp_size)
            reset_seed()
            self.set_world_ranks()
            lightning_api.join_deepspeed_process_group(self)
            self._setup_sequence_parallel(self.root_device.type)
            self._create_engine_groups()
            return
        ulysses.check_sp_size(int(os.environ.get("WORLD_SIZE", 1)), self.config.sp_size)
        seed_everything(self.config.seed, verbose=False)
        self._init_process_group(timeout)
        self._setup_sequence_parallel("cuda" if torch.cuda.is_available() else "cpu")
        if self._engine_mp_group is None:
            self._create_engine_groups()

    def _init_process_group(self, timeout: Optional[timedelta] = None) -> None:
        import deepspeed

        if dist.is_initialized():
            return
        if "MASTER_ADDR" not in os.environ:  # one process without a launcher: DeepSpeed still needs a group
            from lightning.fabric.plugins.environments.lightning import find_free_network_port

            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_network_port()), RANK="0",
                              WORLD_SIZE="1", LOCAL_RANK="0")
        if torch.cuda.is_available():
            torch.cuda.set_device(self.config.device_index())
        deepspeed.init_distributed(
            dist_backend=process_group.default_backend("cuda" if torch.cuda.is_available() else "cpu"),
            timeout=timeout or timedelta(minutes=self.config.dist_timeout_minutes),
        )

    def setup_environment(self) -> None:
        # Lightning's DeepSpeedStrategy refuses anything but CUDA; DeepSpeed's CPU accelerator works
        from deepspeed.accelerator import get_accelerator

        on_cuda = self.root_device.type == "cuda"
        if not on_cuda and get_accelerator().device_name() != "cpu":
            raise RuntimeError("LightRFTDeepSpeed on CPU needs DeepSpeed's CPU accelerator: set DS_ACCELERATOR=cpu")
        self._default_process_group_backend()
        super(DeepSpeedStrategy, self).setup_environment()  # past the parent's CUDA-only check

    # ------------------------------------------------------------------ engines
    def _build_engine(self, module: nn.Module, optimizer: Optional[Optimizer]) -> Any:
        import deepspeed

        train = optimizer is not None
        self._init_process_group()
        engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            model_parameters=None if train else [],
            config=self.ds_config(train=train),
            dist_init_required=False,
        )
        if not train:
            engine.eval()
        return engine

    def _build_optimizer(self, model: nn.Module, **kwargs: Any) -> Optimizer:
        if not self.config.adam_offload:
            return super()._build_optimizer(model, **kwargs)
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam([p for p in model.parameters() if p.requires_grad], adamw_mode=True, **kwargs)
        except Exception as err:  # the op is JIT-built; a missing compiler or headers fail here
            raise RuntimeError(
                f"StrategyConfig.adam_offload=True needs DeepSpeed's cpu_adam op, which failed to build: {err}; "
                "accepted: adam_offload=False, or a machine where `ds_report` shows cpu_adam compatible"
            ) from err

    def _prepare_model(self, model: nn.Module, optimizer: Optional[Optimizer], train: bool) -> tuple[nn.Module, Any]:
        if isinstance(model, DeepSpeedModel):
            raise ValueError("prepare: this model is already prepared by LightRFTDeepSpeed")
        if train and optimizer is None:
            optimizer = self.create_optimizer(model)
        handle = DeepSpeedModel(model, self, unwrap_optimizer(optimizer) if train else None)
        if train:
            return handle, handle.engine.optimizer  # built now: the caller gets DeepSpeed's optimizer
        return handle, None

    def prepare(self, *models: Any, is_rlhf: bool = False) -> Any:
        """As ``StrategyBase.prepare``; each model comes back as a :class:`DeepSpeedModel`, and the
        scheduler of a ``(model, optimizer, scheduler)`` tuple is stepped by its engine."""
        prepared = super().prepare(*models, is_rlhf=is_rlhf)
        for item in prepared if len(models) > 1 else [prepared]:
            if isinstance(item, tuple) and item[2] is not None:
                self._engine(item[0]).lr_scheduler = item[2]
        return prepared

    def create_optimizer(self, model: nn.Module, **kwargs: Any) -> Optimizer:
        """As ``StrategyBase.create_optimizer``; a model prepared for inference becomes a training
        engine (built on its first use)."""
        model = self._inner(model)
        if not isinstance(model, DeepSpeedModel):
            return super().create_optimizer(model, **kwargs)
        optimizer = super().create_optimizer(model.module, **kwargs)
        model._set_optimizer(optimizer)
        model.train()
        self._train_states[id(model)] = self._train_states.pop(id(model.module))
        self._train_states[id(model)].model = model
        return optimizer

    def _engine(self, model: nn.Module) -> Any:
        model = self._inner(model)
        if isinstance(model, DeepSpeedModel):
            return model.engine
        for _, handle in self._handles:
            if handle.module is model:
                return handle.engine
        if hasattr(model, "backward") and hasattr(model, "module"):  # a bare DeepSpeedEngine
            return model
        raise TypeError(f"{type(model).__name__} was not prepared by LightRFTDeepSpeed: pass the model prepare() returned "
                        "(or, under a Trainer, a child module of the LightningModule)")

    def engine_of(self, model: nn.Module) -> Any:
        """The ``DeepSpeedEngine`` that runs ``model`` (a prepared model, or a child of the LightningModule)."""
        return self._engine(model)

    # ------------------------------------------------------------------ training step
    def _stepped_backward(self, loss: torch.Tensor, stepper: Stepper) -> torch.Tensor:
        # the engine divides by its gradient_accumulation_steps (the strategy's accumulation steps)
        if self._hooked_module() is not None:
            return self._lightning_backward(loss, stepper.optimizer)
        self._engine(stepper.model).backward(loss)
        return loss

    def _stepped_optimizer_step(self, stepper: Stepper) -> bool:
        engine = self._engine(stepper.model)
        module = self._hooked_module()
        if module is not None and engine.is_gradient_accumulation_boundary():
            lightning_api.before_optimizer_step(self.precision_plugin, module, stepper.optimizer)
        # what ds_config() gives the engine, without building the whole config on every step
        return self._engine_step(stepper, float(self.user_ds_config.get("gradient_clipping", self.config.max_norm)))

    def _engine_step(self, stepper: Stepper, max_norm: float) -> bool:
        """``engine.step()``: a real step on accumulation boundaries (clip the global gradient norm to
        ``max_norm`` (0: no clipping), step, zero grads and step the stepper's scheduler), skipped when
        the gradient norm is not finite; the engine decides, the stepper counts."""
        engine = self._engine_of_stepper(stepper.model)
        boundary = engine.is_gradient_accumulation_boundary()
        skipped = engine.skipped_steps
        parallel_deepspeed.set_gradient_clipping(engine, max_norm)
        engine.step()
        stepper.micro_steps += 1
        if not boundary:
            return False
        stepped = stepper.record(engine.get_global_grad_norm(), skipped=engine.skipped_steps > skipped)
        self._log_step(stepper, skipped=not stepped)
        return stepped

    # ------------------------------------------------------------------ Lightning training step
    def _lightning_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``backward(loss, optimizer)`` (``manual_backward``, automatic optimization): the engine is the
        optimizer's, or the one the loss depends on."""
        optimizer = args[0] if args else kwargs.pop("optimizer", None)
        module = self.lightning_module
        self.pre_backward(loss)
        loss = self.precision_plugin.pre_backward(loss, module)
        handle = (handle_for_optimizer(self._handles, optimizer) if optimizer is not None
                  else handle_for_loss(self._handles, self._forwarded, loss))
        self._forwarded.pop(handle, None)
        if module.automatic_optimization:
            # Lightning's closure already divided the loss by accumulate_grad_batches: not again
            kwargs.setdefault("scale_wrt_gas", False)
        handle.engine.backward(loss, *args[1:], **kwargs)
        loss = self.precision_plugin.post_backward(loss, module)
        self.post_backward(loss)
        return loss

    def _lightning_optimizer_step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """``optimizer_step(optimizer, closure, model)`` (``LightningOptimizer.step``): steps the optimizer's engine."""
        closure = args[0] if args else kwargs.pop("closure")
        model = (args[1] if len(args) > 1 else kwargs.pop("model", None)) or self.lightning_module
        closure()
        lightning_api.before_optimizer_step(self.precision_plugin, model, optimizer)  # hooks, automatic clipping
        handle = handle_for_optimizer(self._handles, optimizer)
        name = next(n for n, h in self._handles if h is handle)
        plugin = self.precision_plugin
        requested = plugin.take_requested_max_norm() if isinstance(plugin, EngineClippingPrecision) else 0.0
        return self._engine_step(self.stepper(handle.module, name=name), requested or self._lightning_max_norm())

    def _lightning_max_norm(self) -> float:
        # the Lightning shape clips only when asked to, or when the user's ds_config says so
        return float(self.user_ds_config.get("gradient_clipping", 0.0))

    # ------------------------------------------------------------------ Lightning setup
    def _init_config_if_needed(self) -> None:
        """Nothing to format: each engine's DeepSpeed config is built from ``StrategyConfig`` (:meth:`ds_config`)."""

    def setup_optimizers(self, trainer: Any) -> None:
        # Lightning's DeepSpeedStrategy leaves them to its one engine; here configure_optimizers gives
        # the optimizer (and schedulers) of each child, as under every other strategy
        super(DeepSpeedStrategy, self).setup_optimizers(trainer)

    def init_deepspeed(self) -> None:
        """Build a training engine for each child of the ``LightningModule`` that an optimizer trains and
        an inference engine for each frozen child (``DeepSpeedStrategy.setup`` calls it last). The
        children stay where they are; each one's ``forward`` runs through its engine (as Lightning's own
        DeepSpeed strategy redirects the module's ``forward``) until the next ``setup``.
        ``trainer.strategy.optimizers`` become the engines' optimizers; :meth:`engine_of` gives a child's engine."""
        module = self.lightning_module
        owners = optimizer_children(module, self.optimizers)
        self._release_engines()
        for name, child in parallel_deepspeed.engine_build_order(list(module.named_children()), owners):
            params = list(child.parameters())
            if name in owners:
                handle = DeepSpeedModel(child, self, unwrap_optimizer(owners[name]))
            elif params and not any(p.requires_grad for p in params):
                handle = DeepSpeedModel(child, self)
            else:
                continue
            route_forward(child, handle, self._forwarded)  # built now: every rank builds them in the same order
            self._handles.append((name, handle))
            if handle.is_training_engine:
                self.stepper(child, handle.engine.optimizer, name=name)
        by_client = {id(h._optimizer): h.engine.optimizer for _, h in self._handles if h.is_training_engine}
        self.optimizers = [by_client[id(unwrap_optimizer(opt))] for opt in self.optimizers]

    def _release_engines(self) -> None:
        """Give the children their own ``forward`` back and drop the engines."""
        for _, handle in self._handles:
            handle.module.__dict__.pop("forward", None)
        self._handles = []
        self._forwarded.clear()

    def init_model_context(self, meta_init: bool = False) -> AbstractContextManager:
        """LightRFT's model-building context; under ZeRO-3 (once ``setup_distributed`` ran) models are built
        partitioned, a Hugging Face ``from_pretrained`` loading its weights into the partitions: no whole
        model per rank (:func:`~lightrft_lightning.parallel.deepspeed.zero3_init`). ``meta_init=True``: as
        on every strategy."""
        if self.zero_stage_3 and not meta_init and dist.is_initialized():
            return parallel_deepspeed.zero3_init(self.ds_config(train=True))
        return super().init_model_context(meta_init)

    def _materialize_lightning_module(self) -> None:
        # under ZeRO-3 a pretrained actor built on the meta device (and its reference, PPO's critic) is
        # partitioned straight from its checkpoint, each rank reading only its own ranges
        module = self.lightning_module
        if module is None or not has_meta(module):
            return
        config = self.ds_config(train=True)
        if not parallel_deepspeed.reads_pretrained_partitions(config):
            return super()._materialize_lightning_module()
        materialize_meta(module, torch.device("cpu"), self.config.seed, leave_pretrained=True)
        trained = {name for name, child in module.named_children() if any(p.requires_grad for p in child.parameters())}
        # in the order init_deepspeed builds their engines: DeepSpeed numbers the parameters as they are partitioned
        for _, child in parallel_deepspeed.engine_build_order(list(module.named_children()), trained):
            if has_meta(child):
                parallel_deepspeed.load_pretrained_partitions(child, config)

    def model_sharded_context(self) -> AbstractContextManager:
        # engines partition their models at setup; no deepspeed.zero.Init around configure_model
        return nullcontext()

    def _engine_of_stepper(self, model: nn.Module) -> Any:
        """``model``'s engine, holding the scheduler its stepper steps (the engine saves and loads it)."""
        engine, scheduler = self._engine(model), self.stepper(model).scheduler
        if scheduler is not None:
            engine.lr_scheduler = scheduler
        return engine

    def _training_handles(self) -> list[tuple[str, DeepSpeedModel]]:
        return [(name, handle) for name, handle in self._handles if handle.is_training_engine]


DeepspeedStrategy = LightRFTDeepSpeed  # LightRFT's name
