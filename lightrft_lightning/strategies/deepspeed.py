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
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import reset_seed, seed_everything
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, Precision
from lightning.pytorch.strategies.deepspeed import DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn
from torch.optim import Optimizer

from lightrft_lightning import checkpoint, lightning_api, process_group
from lightrft_lightning.lightning_api import unwrap_optimizer
from lightrft_lightning.lora import has_lora
from lightrft_lightning.parallel import deepspeed as parallel_deepspeed
from lightrft_lightning.parallel import ulysses
from lightrft_lightning.parallel.deepspeed_loading import weights_only_loads
from lightrft_lightning.parallel.meta_init import has_meta, materialize_meta
from lightrft_lightning.parallel.stepper import Stepper
from lightrft_lightning.strategies.base import TRAIN_STATES, StrategyBase, lightrft_config
from lightrft_lightning.strategies.deepspeed_engines import (DeepSpeedModel, loss_sources, optimizer_children,
                                                            route_forward)

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


class LightRFTDeepSpeed(StrategyBase, DeepSpeedStrategy):
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
        handle = self._handle_for_optimizer(optimizer) if optimizer is not None else self._handle_for_loss(loss)
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
        handle = self._handle_for_optimizer(optimizer)
        name = next(n for n, h in self._handles if h is handle)
        plugin = self.precision_plugin
        requested = plugin.take_requested_max_norm() if isinstance(plugin, EngineClippingPrecision) else 0.0
        return self._engine_step(self.stepper(handle.module, name=name), requested or self._lightning_max_norm())

    def _lightning_max_norm(self) -> float:
        # the Lightning shape clips only when asked to, or when the user's ds_config says so
        return float(self.user_ds_config.get("gradient_clipping", 0.0))

    def _handle_for_optimizer(self, optimizer: Any) -> DeepSpeedModel:
        optimizer = unwrap_optimizer(optimizer)
        for _, handle in self._handles:
            if handle.built and handle.is_training_engine and handle.engine.optimizer is optimizer:
                return handle
        raise ValueError("LightRFTDeepSpeed: this optimizer belongs to none of the strategy's DeepSpeed engines")

    def _handle_for_loss(self, loss: torch.Tensor) -> DeepSpeedModel:
        """The training engine a ``manual_backward(loss)`` without an optimizer goes to: the only one, the
        one whose forward ran with gradients since its last backward, or, where several did (an actor
        and a critic forward, then a backward for each), the one whose outputs ``loss`` was computed from
        (the graph is searched from the loss back to those outputs, never into the models)."""
        training = [h for _, h in self._training_handles()]
        if len(training) == 1:
            return training[0]
        pending = [h for h in training if h in self._forwarded]
        if len(pending) > 1:
            pending = loss_sources(loss, {h: self._forwarded[h] for h in pending})
        if len(pending) != 1:
            names = ", ".join(n for n, h in self._training_handles() if h in pending) or "none"
            raise RuntimeError(
                f"manual_backward: {len(training)} DeepSpeed training engines, and the loss comes from the outputs "
                f"of {names}; accepted: a loss computed from one model's outputs, or "
                "manual_backward(loss, stepper=trainer.strategy.stepper(model))")
        return pending[0]

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

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The ``LightningModule``'s full state dict, keyed as under every other strategy (ZeRO-3
        partitions gathered bucket by bucket), on rank 0; ``{}`` on the other ranks. A collective."""
        from lightrft_lightning.engines.weight_sync import iter_weight_buckets

        module = self.lightning_module
        assert module is not None
        params = iter(module.named_parameters())
        full: dict[int, torch.Tensor] = {}
        for bucket in iter_weight_buckets(module, 256 * 2**20):
            for _, tensor in bucket:
                param = next(params)[1]
                if self.is_global_zero:
                    full[id(param)] = tensor.detach().to("cpu", copy=True)
        if not self.is_global_zero:
            return {}
        return {key: full[id(value)] if id(value) in full else value.detach().to("cpu", copy=True)
                for key, value in module.state_dict(keep_vars=True).items()}

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return {}  # DeepSpeed saves the optimizer states itself, partitioned

    # ------------------------------------------------------------------ checkpoints
    def _write_ckpt(self, model: nn.Module, tmp: Path, extra: dict[str, Any], options: dict[str, Any]) -> None:
        # the engine's own checkpoint: weights, optimizer and scheduler, partitioned as trained
        exclude_frozen = options.pop("exclude_frozen_parameters", False)
        if options:
            raise ValueError(f"save_ckpt: {sorted(options)} are not supported by {type(self).__name__}; accepted: "
                             "optimizer=, scheduler=, exclude_frozen_parameters=")
        self._engine_of_stepper(model).save_checkpoint(str(tmp.parent), tag=tmp.name, client_state=extra,
                                                       save_latest=False, exclude_frozen_parameters=exclude_frozen)

    @staticmethod
    def _is_ckpt_dir(path: Path) -> bool:
        return any(path.glob("*model_states.pt"))

    def _read_ckpt(self, model: nn.Module, load_dir: str, tag: Optional[str], strict: bool, optimizer_states: bool,
                   scheduler_states: bool, module_only: bool) -> tuple[str, dict]:
        if tag is None and not (Path(load_dir) / checkpoint.LATEST).is_file():
            raise FileNotFoundError(f"no checkpoint to load: {Path(load_dir) / checkpoint.LATEST} does not exist")
        engine = self._engine_of_stepper(model)
        if module_only and engine.zero_optimization_partition_weights():
            tag = tag or (Path(load_dir) / checkpoint.LATEST).read_text().strip()
            return parallel_deepspeed.load_zero3_weights(engine, load_dir, tag), {}
        with weights_only_loads():
            path, extra = engine.load_checkpoint(
                load_dir, tag=tag, load_module_strict=strict, load_optimizer_states=optimizer_states,
                load_lr_scheduler_states=scheduler_states, load_module_only=module_only)
        if path is None:
            raise FileNotFoundError(f"loading DeepSpeed checkpoint {load_dir} (tag={tag}) failed: no such checkpoint")
        return path, extra or {}

    def _engine_of_stepper(self, model: nn.Module) -> Any:
        """``model``'s engine, holding the scheduler its stepper steps (the engine saves and loads it)."""
        engine, scheduler = self._engine(model), self.stepper(model).scheduler
        if scheduler is not None:
            engine.lr_scheduler = scheduler
        return engine

    def save_checkpoint(self, checkpoint_dict: dict, filepath: Any,
                        storage_options: Optional[checkpoint.Publish] = None) -> checkpoint.SaveHandle:
        """Lightning checkpoint: a DCP directory ``filepath`` laid out as under ``LightRFTFSDP`` (the
        module's full ``state_dict``, keyed as on every backend, and the Trainer's state and step
        counters in ``extra_state.pt``), plus one DeepSpeed checkpoint per training engine in
        ``filepath/<child name>/`` (partitioned weights, optimizer and engine state), which resuming
        loads, written through the checkpoint writer. Frozen children are in ``state_dict`` only.
        ``storage_options`` may be a :class:`~lightrft_lightning.checkpoint.Publish` (not asynchronous:
        DeepSpeed writes its files synchronously)."""
        options = checkpoint.Publish.of(storage_options, type(self).__name__)
        if options.async_save:
            raise ValueError("LightRFTDeepSpeed.save_checkpoint: Publish.async_save=True is not supported (DeepSpeed "
                             "writes its checkpoints synchronously); accepted: async_save=False")
        path = Path(self.broadcast(str(filepath)))
        dcp_state = {"state_dict": checkpoint_dict.pop("state_dict", {})}
        checkpoint_dict.pop("optimizer_states", None)
        checkpoint_dict[TRAIN_STATES] = self.train_states_dict()

        def fill(tmp: Path) -> None:
            checkpoint.write_dcp(tmp, dcp_state, checkpoint_dict, is_rank_0=self.is_global_zero)
            for name, handle in self._training_handles():
                # a LoRA model's frozen base is rebuilt from its model: its engine saves the adapters
                handle.engine.save_checkpoint(str(tmp / name), tag="checkpoint",
                                              exclude_frozen_parameters=self.exclude_frozen_parameters
                                              or has_lora(handle.module))

        return checkpoint.write_checkpoint(path, fill, options, is_rank_0=self.is_global_zero, barrier=self.barrier)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load a checkpoint written by :meth:`save_checkpoint` into the engines (optimizer states only
        when fitting) and return the Trainer's state."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / checkpoint.EXTRA_STATE).is_file():
            raise FileNotFoundError(f"{path} is not a LightRFTDeepSpeed checkpoint: {path / checkpoint.EXTRA_STATE} is missing")
        extra = checkpoint.load_extra(str(path))
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        for name, handle in self._training_handles():
            directory = path / name
            if not (directory / checkpoint.LATEST).is_file():
                raise FileNotFoundError(f"{path} is not a LightRFTDeepSpeed checkpoint of this module: "
                                        f"{directory / checkpoint.LATEST} is missing")
            with weights_only_loads():
                loaded, _ = handle.engine.load_checkpoint(
                    str(directory), load_optimizer_states=fitting, load_lr_scheduler_states=False,
                    load_module_strict=self.lightning_module.strict_loading and not has_lora(handle.module))
            if loaded is None:
                raise RuntimeError(f"DeepSpeed could not load {directory}")
        self.load_train_states_dict(extra.pop(TRAIN_STATES, {}))
        return extra

    def _training_handles(self) -> list[tuple[str, DeepSpeedModel]]:
        return [(name, handle) for name, handle in self._handles if handle.is_training_engine]

    # ------------------------------------------------------------------ weights
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

    # ------------------------------------------------------------------ LightRFT memory, EMA, weight files
    def prepare_model(self, model: Any, is_training: bool = False, shard_size: Any = -1,
                      reshard_after_forward: bool = True) -> Any:
        """As ``StrategyBase.prepare_model``: a :class:`DeepSpeedModel` whose engine is built on first
        use (a training engine once ``create_optimizer`` gave it an optimizer)."""
        return super().prepare_model(model, is_training, shard_size, reshard_after_forward)

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


DeepspeedStrategy = LightRFTDeepSpeed  # LightRFT's name


def _non_persistent(module: nn.Module, buffer_name: str) -> set[str]:
    owner = module.get_submodule(buffer_name.rpartition(".")[0]) if "." in buffer_name else module
    return owner._non_persistent_buffers_set
