"""`StrategyBase`: the LightRFT API, written once and shared by every strategy.

The LightRFT names collide with two Lightning ``Strategy`` methods, and both call shapes keep working:

============================================  =============================================
LightRFT shape (second argument is a module)  Lightning shape (what the Trainer calls)
============================================  =============================================
``backward(loss, model, optimizer)``          ``backward(loss, optimizer, *args)``
``optimizer_step(optimizer, model, sched)``   ``optimizer_step(optimizer, closure, model)``
============================================  =============================================

The LightRFT shape gives LightRFT semantics: the loss is divided by the accumulation steps, and
every ``accumulation_steps``-th call clips the global gradient norm to ``max_norm``, steps (or skips
and counts the step when the norm is not finite), zeroes the gradients and steps the scheduler.
The Lightning shape falls through to the Lightning strategy unchanged, so ``manual_backward`` and
``LightningOptimizer.step`` behave as Lightning documents.

This module holds what every strategy is (config, process group, prepare/create_optimizer,
backward/optimizer_step, engine sleep/wake-up, Lightning integration). The ranks' layout and the
collectives, checkpoints and export, and LightRFT's compatibility helpers, are mixins of their own, which
``StrategyBase`` inherits:
:class:`~lightrft_lightning.strategies.data_parallel.DataParallelMixin` (the ``(dp, sp)`` layout of the
ranks for sequence parallelism, ``dp_rank`` / ``dp_world_size``, ``all_reduce`` / ``all_gather`` over the
data-parallel ranks, rank-0 printing),
:class:`~lightrft_lightning.strategies.checkpointing.CheckpointMixin` (``save_ckpt`` / ``load_ckpt``,
Lightning's ``save_checkpoint`` / ``load_checkpoint`` with the step counters, ``save_model``),
:class:`~lightrft_lightning.strategies.lightrft_compat.LightRFTCompatMixin` (LightRFT's constructor attributes and ``args``, model set-up,
meta init, data loaders, offload, EMA, weight files, memory reports) and
:class:`~lightrft_lightning.strategies.lightrft_engines.LightRFTEngineMixin` (LightRFT's rollout
engine calls).
"""

from __future__ import annotations

import contextlib
import logging
import os
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any, Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from lightning.fabric.utilities.seed import seed_everything
from torch.optim import Optimizer

from lightrft_lightning import lightning_api, process_group
from lightrft_lightning.config import StrategyConfig, precision_name
from lightrft_lightning.lightning_api import unwrap_optimizer
from lightrft_lightning.parallel.meta_init import parameters_on_meta
from lightrft_lightning.parallel.stepper import Stepper
from lightrft_lightning.strategies.checkpointing import TRAIN_STATES, CheckpointMixin  # noqa: F401  (re-exported)
from lightrft_lightning.strategies.data_parallel import DataParallelMixin
from lightrft_lightning.strategies.lightrft_compat import (  # noqa: F401  (re-exported: importable from here)
    LightRFTCompatMixin,
    lightrft_config,
    ResumableDistributedSampler,
    _is_hf_model,
    is_actor,
    is_engine,
    lightrft_scheduler,
)
from lightrft_lightning.strategies.lightrft_engines import (  # noqa: F401  (re-exported: importable from here)
    GenerationOutput,
    LightRFTEngineMixin,
    to_sampling_params,
)

log = logging.getLogger(__name__)

class StrategyBase(DataParallelMixin, CheckpointMixin, LightRFTCompatMixin, LightRFTEngineMixin):
    """LightRFT's strategy API. Mixed into each Lightning strategy (``LightRFTFake``,
    ``LightRFTFSDP``, ``LightRFTDeepSpeed``) before the Lightning base class. LightRFT's
    compatibility helpers come from the two mixins (see the module docstring).

    Backends override the small hooks (``_prepare_model``, ``_no_gradient_sync``,
    ``_clip_grad_norm``, ``_model_state_dict``...) rather than the public methods.
    """

    def __init__(self, config: Union[StrategyConfig, Any, None] = None) -> None:
        self.config = StrategyConfig.from_args(config)
        self._train_states: dict[int, Stepper] = {}
        self._frozen_requires_grad: dict[int, dict[str, bool]] = {}
        self.engines: list[Any] = []
        self._init_data_parallel()
        self._init_lightrft_compat()
        self._init_lightrft_engines()

    @property
    def world_size(self) -> int:
        """All processes: the Trainer's cluster environment under a Trainer, else the process group's size (1
        without one); ``dp_world_size`` is this // ``sp_size``."""
        env = getattr(self, "cluster_environment", None)
        if env is not None:
            return env.world_size()
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @world_size.setter
    def world_size(self, value: int) -> None:  # Lightning's SingleDeviceStrategy assigns 1
        if value != self.world_size:
            raise AttributeError(f"{type(self).__name__}.world_size is the process group's size ({self.world_size}); "
                                 f"it cannot be set to {value}")

    # ------------------------------------------------------------------ process group
    def setup_distributed(self, timeout: Optional[timedelta] = None, num_gpu_per_node: Optional[int] = None) -> None:
        """Seed every RNG and, when launched with several processes, join the process group and build
        the engine groups. ``num_gpu_per_node`` (LightRFT's) is not needed: the device is
        ``StrategyConfig.local_rank`` (a launcher's ``--local_rank``), else ``$LOCAL_RANK``."""
        seed_everything(self.config.seed, verbose=False)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            timeout = timeout or timedelta(minutes=self.config.dist_timeout_minutes)
            if torch.cuda.is_available():
                torch.cuda.set_device(self.config.device_index())
            backend = process_group.default_backend("cuda" if torch.cuda.is_available() else "cpu")
            dist.init_process_group(backend=backend, timeout=timeout)
        self._create_engine_groups()

    def _default_process_group_backend(self) -> None:
        """Under a Trainer, join with :func:`~lightrft_lightning.process_group.default_backend` unless a backend
        was given (Lightning's own default is NCCL-only on CUDA)."""
        lightning_api.set_process_group_backend(self, process_group.default_backend(self.root_device.type))  # type: ignore[attr-defined]

    def sync_and_clear_cache(self) -> None:
        """Wait for the device, meet every rank, and return cached accelerator memory to the driver."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._barrier()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def accumulation_steps(self) -> int:
        return self.config.accumulation_steps(self.dp_world_size)

    # ------------------------------------------------------------------ models and optimizers
    def prepare(self, *models: Any, is_rlhf: bool = False) -> Any:
        """Prepare models for this backend.

        A ``(model, optimizer, scheduler)`` tuple is prepared for training; a bare model is prepared
        for inference (frozen, eval mode) until :meth:`create_optimizer` is called for it; a list (or
        tuple) of models, e.g. reward models, is a list of models prepared for inference. ``None``
        and a ``(None, None, None)`` tuple pass through. An ``is_actor`` wrapper is prepared through
        its ``.model`` (see :func:`is_actor`). Returns one item for one argument, else a list in the
        same order. ``is_rlhf`` is LightRFT's (its DeepSpeed batch-size corner case) and changes nothing.
        """
        prepared = [self._prepare_item(item) for item in models]
        return prepared[0] if len(prepared) == 1 else prepared

    def _prepare_item(self, item: Any) -> Any:
        if item is None:
            return None
        if isinstance(item, (tuple, list)):
            if all(isinstance(m, nn.Module) for m in item):  # a list of (reward) models
                return [self._prepare_item(m) for m in item]
            if len(item) > 3:
                raise ValueError(f"prepare: a tuple of {len(item)} items is neither (model, optimizer, scheduler) nor "
                                 "a list of models; accepted: (model, optimizer, scheduler), (model, optimizer), or "
                                 "a list of modules")
            model, optimizer, scheduler = (list(item) + [None, None])[:3]
            if model is None:
                return (None, None, None)
            if not isinstance(model, nn.Module):
                raise TypeError(f"prepare: the first item of a (model, optimizer, scheduler) tuple is a "
                                f"{type(model).__name__}; accepted: an nn.Module")
            inner = self._materialize(self._inner(model))
            self._enable_gradient_checkpointing([inner])
            self._enable_sequence_parallel(inner)
            prepared, optimizer = self._prepare_model(inner, optimizer, train=True)
            self._train_states[id(prepared)] = Stepper(unwrap_optimizer(optimizer), scheduler, model=prepared)
            return (self._rewrap(model, prepared), optimizer, scheduler)
        if not isinstance(item, nn.Module):
            raise TypeError(f"prepare: cannot prepare a {type(item).__name__}; accepted: an nn.Module, a (model, "
                            "optimizer, scheduler) tuple, a list of modules, or None")
        inner = self._materialize(self._inner(item))
        self._enable_sequence_parallel(inner)
        self._frozen_requires_grad[id(inner)] = {n: p.requires_grad for n, p in inner.named_parameters()}
        prepared, _ = self._prepare_model(inner, None, train=False)
        prepared.eval().requires_grad_(False)
        return self._rewrap(item, prepared)

    @staticmethod
    def _inner(model: Any) -> Any:
        """The model the strategy works on: ``model.model`` for an ``is_actor`` wrapper, else ``model``."""
        return model.model if is_actor(model) else model

    @staticmethod
    def _rewrap(model: Any, prepared: nn.Module) -> Any:
        """Put a prepared inner model back into its ``is_actor`` wrapper (DeepSpeed returns a new object)."""
        if is_actor(model):
            if model.model is not prepared:
                model.model = prepared
            return model
        return prepared

    def create_optimizer(self, model: nn.Module, **kwargs: Any) -> Optimizer:
        """AdamW over the model's trainable parameters (an ``is_actor`` wrapper's ``.model``); lr, betas
        and weight decay default to the config (``actor_learning_rate``, ``adam_betas``, ``l2``). A model
        prepared for inference becomes trainable again."""
        model = self._materialize(self._inner(model))
        flags = self._frozen_requires_grad.pop(id(model), None)
        if flags is not None:
            for name, param in model.named_parameters():
                param.requires_grad_(flags.get(name, True))
            model.train()
        self._enable_gradient_checkpointing([model])
        kwargs.setdefault("lr", self.config.actor_learning_rate)
        kwargs.setdefault("betas", self.config.adam_betas)
        kwargs.setdefault("weight_decay", self.config.l2)
        optimizer = self._build_optimizer(model, **kwargs)
        self.stepper(model, optimizer)  # its counters stay: fit(ckpt_path) restores them before configure_optimizers
        return optimizer

    def unwrap_model(self, model: Any) -> Any:
        """The user's module: through an ``is_actor`` wrapper's ``.model`` and the backend's wrapper
        (a DeepSpeed engine's ``.module``)."""
        if model is None:
            return None
        return self._unwrapped(self._inner(model))

    def _enable_gradient_checkpointing(self, models: Iterable[nn.Module]) -> None:
        """With ``StrategyConfig.gradient_checkpointing``, recompute the activations of each Hugging Face
        model in ``models`` in its backward pass (:func:`enable_gradient_checkpointing`)."""
        if not self.config.gradient_checkpointing:
            return
        for model in models:
            inner = getattr(model, "module", model)  # a prepared DeepSpeed model
            if not hasattr(inner, "gradient_checkpointing_enable"):
                raise ValueError(
                    f"StrategyConfig.gradient_checkpointing=True, but {type(inner).__name__} cannot recompute its "
                    "activations; accepted: gradient_checkpointing=False, or Hugging Face models "
                    "(with gradient_checkpointing_enable)")
            enable_gradient_checkpointing(inner)

    def _trainable_children(self, module: nn.Module) -> list[nn.Module]:
        """The children of a LightningModule that hold trainable parameters (actor, critic...)."""
        return [c for c in module.children() if any(p.requires_grad for p in c.parameters())]

    def training_precision(self) -> str:
        """The precision models train in ("bf16", "fp16" or "fp32"), on every backend alike: under a Trainer
        its ``precision`` decides, and a config that asks for fp32 or fp16 (``bf16=False`` / ``fp16=True``,
        away from LightRFT's bf16 default) against a Trainer that trains otherwise is refused; standalone,
        the config's."""
        configured = self.config.precision
        plugin = lightning_api.given_precision_plugin(self)  # set by the Trainer
        if plugin is None:
            return configured
        flag = str(plugin.precision)
        precision = precision_name(flag)
        if configured != "bf16" and precision != configured:
            raise ValueError(f"{type(self).__name__}: Trainer(precision={flag!r}) trains in {precision}, but the "
                             f"strategy's config says {configured} (StrategyConfig.bf16={self.config.bf16}, "
                             f"fp16={self.config.fp16}); accepted: the same precision in both, or bf16/fp16 left at "
                             "LightRFT's defaults (bf16=True, fp16=False), which follow the Trainer")
        return precision

    def setup(self, trainer: Any) -> None:
        """Check the precision, materialize what ``init_module(empty_init=True)`` left on the meta device,
        enable gradient checkpointing, then the Lightning strategy's own ``setup`` (:meth:`_lightning_setup`)."""
        self.training_precision()  # refuses a config that disagrees with the Trainer
        self._materialize_lightning_module()
        self._enable_gradient_checkpointing(self._trainable_children(self.lightning_module))
        self._enable_sequence_parallel(self.lightning_module)
        self._lightning_setup(trainer)

    def _lightning_setup(self, trainer: Any) -> None:
        """Backend hook: the Lightning parent's ``setup``."""
        super().setup(trainer)  # type: ignore[misc]

    def _materialize_lightning_module(self) -> None:
        """Give the parameters that ``trainer.init_module(empty_init=True)`` left on the meta device the
        weights a normal construction gives (see :meth:`tensor_init_context`); every backend's ``setup``
        calls it first."""
        module = self.lightning_module  # type: ignore[attr-defined]
        if module is not None:
            self._materialize(module)

    @contextlib.contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Iterator[None]:
        """What ``trainer.init_module(empty_init=...)`` (and ``configure_model``) build under. With
        ``empty_init=True``, on every backend: parameters are created on the meta device (no memory;
        buffers stay real) and ``setup`` materializes them with the weights the same construction gives
        without it (replayed on the RNG stream it had, so the same seed gives the same weights on every
        rank; see ``parallel.meta_init.materialize_meta``), before moving, sharding or partitioning them. Otherwise
        Lightning's context of the backend."""
        if not empty_init:
            with super().tensor_init_context(empty_init=empty_init):  # type: ignore[misc]
                yield
            return
        with parameters_on_meta(), self.precision_plugin.tensor_init_context():  # type: ignore[attr-defined]
            yield

    def _build_optimizer(self, model: nn.Module, **kwargs: Any) -> Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if "fused" not in kwargs and "foreach" not in kwargs:
            # one kernel per tensor instead of a dozen passes over all of them: ~5x faster on CPU
            kwargs["fused"] = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, **kwargs)

    def _prepare_model(self, model: nn.Module, optimizer: Optional[Optimizer], train: bool) -> tuple[nn.Module, Any]:
        """Backend hook: shard or wrap ``model``; return it with its (possibly rebuilt) optimizer."""
        return model, optimizer

    def stepper(self, model: nn.Module, optimizer: Any = None, scheduler: Any = None,
                name: Optional[str] = None) -> Stepper:
        """The :class:`~lightrft_lightning.parallel.stepper.Stepper` of ``model`` (its optimizer, scheduler and
        step counters); ``optimizer``, ``scheduler`` and ``name`` given here replace the ones it had."""
        model = self._inner(model)
        state = self._train_states.get(id(model))
        if state is None:
            state = self._train_states[id(model)] = Stepper(model=model)
        if optimizer is not None:
            state.optimizer = unwrap_optimizer(optimizer)
        if scheduler is not None:
            state.scheduler = scheduler
        if name is not None:
            state.name = name
        return state

    # ------------------------------------------------------------------ training step
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``backward(loss, optimizer)``; with LightRFT's step semantics (the loss divided by the
        accumulation steps, gradient sync only where the step needs it) when the call names a
        :class:`Stepper`: ``backward(loss, model, optimizer)`` (LightRFT), or ``backward(loss, optimizer,
        stepper=...)`` (``LightningModule.manual_backward(loss, stepper=...)``); see :func:`call_stepper`."""
        stepper = self.call_stepper(args, kwargs, "optimizer")
        if stepper is None:
            return self._lightning_backward(loss, *args, **kwargs)
        return self._stepped_backward(loss, stepper)

    def optimizer_step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``optimizer_step(optimizer, closure, model)``; with LightRFT's step semantics when the
        call names a :class:`Stepper`: ``optimizer_step(optimizer, model, scheduler, name=...)`` (LightRFT), or
        ``optimizer_step(optimizer, closure, stepper=...)`` (``LightningOptimizer.step(stepper=...)``). Then
        every ``accumulation_steps``-th call is a real step (see :class:`Stepper`), and it returns whether
        the optimizer stepped."""
        closure = None if is_lightrft_call(args, kwargs) else (args[0] if args else kwargs.get("closure"))
        stepper = self.call_stepper(args, kwargs, "scheduler", optimizer)
        if stepper is None:
            return self._lightning_optimizer_step(optimizer, *args, **kwargs)
        if closure is not None:
            closure()
        return self._stepped_optimizer_step(stepper)

    def call_stepper(self, args: tuple, kwargs: dict[str, Any], second: str, optimizer: Any = None) -> Optional[Stepper]:
        """The one place that tells the call shapes apart: the :class:`Stepper` a ``backward`` /
        ``optimizer_step`` call asks for (``stepper=``, or the model LightRFT passes second, followed by
        ``second``: the optimizer of ``backward``, the scheduler of ``optimizer_step``), or None for
        Lightning's own semantics. Consumes the LightRFT arguments from ``kwargs``."""
        stepper = kwargs.pop("stepper", None)
        if stepper is not None:
            if not isinstance(stepper, Stepper):
                raise TypeError(f"stepper={type(stepper).__name__}; accepted: a Stepper (strategy.stepper(model))")
            return stepper
        if not is_lightrft_call(args, kwargs):
            return None
        model = args[0] if args else kwargs.pop("model")
        other = args[1] if len(args) > 1 else kwargs.pop(second, None)
        name = kwargs.pop("name", None)
        if second == "optimizer":
            return self.stepper(model, other)
        return self.stepper(model, optimizer, other, name)

    def _lightning_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Backend hook: the Lightning shape (Lightning's own by default)."""
        return super().backward(loss, *args, **kwargs)  # type: ignore[misc]

    def _lightning_optimizer_step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """Backend hook: the Lightning shape (Lightning's own by default)."""
        return super().optimizer_step(optimizer, *args, **kwargs)  # type: ignore[misc]

    def _stepped_backward(self, loss: torch.Tensor, stepper: Stepper) -> torch.Tensor:
        """Backward of ``loss`` / accumulation steps; under a Trainer through Lightning's backward (the
        precision plugin, ``on_before_backward`` / ``on_after_backward``)."""
        steps = self.accumulation_steps
        loss = Stepper.scale(loss, steps)
        with self._no_gradient_sync(stepper.model, stepper.is_boundary(steps)):
            if self._hooked_module() is not None:
                self._lightning_backward(loss, stepper.optimizer)
            else:
                loss.backward()
        return loss

    def _hooked_module(self) -> Any:
        """The LightningModule whose hooks and precision plugin the stepped calls go through: the
        Trainer's module while one of its hooks runs, else None (standalone use)."""
        module = getattr(self, "lightning_module", None)
        return module if lightning_api.in_hook(module) else None

    def _stepped_optimizer_step(self, stepper: Stepper) -> bool:
        """:meth:`Stepper.step` with this backend's clipping; under a Trainer the ``on_before_optimizer_step``
        hooks run first and a loss scaler (fp16) unscales, steps and updates as ``GradScaler`` does."""
        opt, module = stepper.optimizer, self._hooked_module()
        scaler = getattr(self.precision_plugin, "scaler", None) if module is not None else None
        boundary = stepper.is_boundary(self.accumulation_steps)

        def clip(max_norm: float) -> torch.Tensor:
            if scaler is not None:
                scaler.unscale_(opt)  # clip and check the true gradients
            if module is not None:
                lightning_api.before_optimizer_step(self.precision_plugin, module, opt)
            return self._clip_grad_norm(stepper.model, opt, max_norm)

        def optimizer_step() -> None:
            if scaler is None:
                opt.step()
                return
            scaler.step(opt)
            scaler.update()

        skipped = stepper.skipped_steps
        stepped = stepper.step(self.accumulation_steps, self.config.max_norm, clip, optimizer_step,
                               on_skip=scaler.update if scaler is not None else None)  # lower the loss scale
        if boundary:
            self._log_step(stepper, skipped=stepper.skipped_steps > skipped)
        return stepped

    def _no_gradient_sync(self, model: nn.Module, boundary: bool) -> AbstractContextManager:
        """Backend hook: skip the gradient all-reduce/reduce-scatter on non-boundary micro-steps."""
        return nullcontext()

    def _clip_grad_norm(self, model: nn.Module, optimizer: Optimizer, max_norm: float) -> torch.Tensor:
        """Backend hook: clip the global gradient norm (no clipping when ``max_norm`` is 0) and return it."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return torch.tensor(0.0)
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def _log_step(self, state: Stepper, skipped: bool) -> None:
        """``self.log`` the gradient norm and skipped-step count of ``state.name`` on the steps where Lightning
        writes logs (every ``log_every_n_steps``) and on a skipped step. Loggers never see the other
        steps' values, and each ``self.log`` call costs about a millisecond."""
        module = self._hooked_module()
        if module is None or not (skipped or lightning_api.should_update_logs(module.trainer)):
            return
        module.log(f"{state.name}/grad_norm", state.grad_norm if state.grad_norm == state.grad_norm else -1.0)
        module.log(f"{state.name}/skipped_steps", float(state.skipped_steps))

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken through the LightRFT call shape, over all models."""
        return sum(s.steps for s in self._train_states.values())

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped because the gradient norm was not finite, over all models."""
        return sum(s.skipped_steps for s in self._train_states.values())

    def _unwrapped(self, model: nn.Module) -> nn.Module:
        """The user's module inside what :meth:`prepare` returned."""
        return model

    def _accelerator_device(self) -> torch.device:
        """Where trained weights live (and reload to): the strategy's root device."""
        try:
            return torch.device(self.root_device)  # type: ignore[attr-defined]
        except Exception:  # a standalone Lightning strategy without devices yet
            return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    # ------------------------------------------------------------------ Lightning integration
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the module's ``training_step``; under manual optimization ``global_step`` then moves
        by exactly one, however many optimizers stepped (Lightning #17958)."""
        module = self.lightning_module  # type: ignore[attr-defined]
        if module is None or module.automatic_optimization:
            return super().training_step(*args, **kwargs)  # type: ignore[misc]
        with lightning_api.one_global_step(module.trainer):
            return super().training_step(*args, **kwargs)  # type: ignore[misc]


def is_lightrft_call(args: tuple, kwargs: dict) -> bool:
    """The one place that tells the two call shapes of ``backward`` / ``optimizer_step`` apart: LightRFT
    passes the model second (``backward(loss, model, optimizer)``, ``optimizer_step(optimizer, model,
    scheduler)``, or ``model=`` / ``scheduler=`` by keyword); Lightning passes an optimizer or a closure
    there (``backward(loss, optimizer)``, ``optimizer_step(optimizer, closure, model=...)``)."""
    if args:
        return isinstance(args[0], nn.Module)
    return "closure" not in kwargs and (isinstance(kwargs.get("model"), nn.Module) or "scheduler" in kwargs)


def enable_gradient_checkpointing(model: nn.Module, checkpoint_kwargs: Optional[dict[str, Any]] = None) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (Hugging Face checkpointing; ``checkpoint_kwargs`` go to ``torch.utils.checkpoint``, default
    non-reentrant)."""
    kwargs = {"use_reentrant": False} if checkpoint_kwargs is None else checkpoint_kwargs
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
