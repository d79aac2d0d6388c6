"""`CheckpointMixin`: what a strategy writes to disk and reads back, shared by every strategy.

LightRFT's ``save_ckpt`` / ``load_ckpt`` (one DCP directory per tag, published whole by
:func:`~lightrft_lightning.checkpoint.write_checkpoint`), Lightning's ``save_checkpoint`` /
``load_checkpoint`` with the strategy's step counters (:data:`TRAIN_STATES`), and the Hugging Face
export (``save_model``, ``save_merged_model``). Backends override the ``_write_ckpt`` / ``_read_ckpt`` /
``_model_state`` hooks (DeepSpeed writes its own layout; FSDP2 reads sharded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from lightrft_lightning import checkpoint
from lightrft_lightning.lightning_api import unwrap_optimizer

TRAIN_STATES = "lightrft_train_states"  # the key of the strategy's step counters in a Lightning checkpoint


class CheckpointMixin:
    """Checkpoints and export of :class:`~lightrft_lightning.strategies.base.StrategyBase`."""

    def save_ckpt(
        self,
        model: nn.Module,
        save_dir: str,
        tag: Optional[str] = None,
        max_num: int = 3,
        max_mem: float = 1000,
        client_state: Optional[dict] = None,
        save_latest: bool = True,
        **kwargs: Any,
    ) -> str:
        """Save ``model`` with its optimizer and scheduler and ``client_state`` as the checkpoint
        ``save_dir/tag`` (atomically: written aside, then renamed; the backend writes the files,
        :meth:`_write_ckpt`), keep at most ``max_num`` checkpoints and ``max_mem`` GB, and point
        ``save_dir/latest`` at it. Returns the path. LightRFT's FSDP keywords ``optimizer=`` /
        ``scheduler=`` must name the model's own (or give it one)."""
        self._bind_ckpt_objects(model, kwargs)
        state = self.stepper(model)
        tag = tag or f"global_step{state.steps}"
        extra = {"client_state": client_state or {}, "train_state": state.counters()}
        options = checkpoint.Publish(latest=save_latest, max_num=max_num, max_mem=max_mem,
                                     is_checkpoint=self._is_ckpt_dir)
        return checkpoint.write_checkpoint(Path(save_dir) / tag, lambda tmp: self._write_ckpt(model, tmp, extra, kwargs),
                                           options, is_rank_0=self.is_rank_0(), barrier=self._barrier).path

    def _write_ckpt(self, model: nn.Module, tmp: Path, extra: dict[str, Any], options: dict[str, Any]) -> None:
        """Backend hook: write ``model``'s checkpoint with ``extra`` into ``tmp`` (DCP here); ``options`` are
        the remaining keywords of ``save_ckpt``."""
        if options:
            raise ValueError(f"save_ckpt: {sorted(options)} are not supported by {type(self).__name__}; accepted: "
                             "optimizer=, scheduler=")
        state = self.stepper(model)
        extra = {**extra, "scheduler": state.scheduler.state_dict() if state.scheduler else None}
        checkpoint.write_dcp(tmp, self._model_state(model, state.optimizer), extra, is_rank_0=self.is_rank_0())

    @staticmethod
    def _is_ckpt_dir(path: Path) -> bool:
        """Backend hook: whether a directory of ``save_dir`` is one of :meth:`save_ckpt`'s (rotation counts those)."""
        return (path / checkpoint.METADATA).is_file()

    def load_ckpt(
        self,
        model: nn.Module,
        load_dir: str,
        tag: Optional[str] = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
        **kwargs: Any,
    ) -> tuple[str, dict]:
        """Load a checkpoint written by :meth:`save_ckpt` (``tag`` defaults to ``latest``) into
        ``model`` and its optimizer and scheduler. Returns ``(path, client_state)``. LightRFT's FSDP call
        shape ``load_ckpt(model, dir, optimizer, scheduler)`` and its ``optimizer=`` / ``scheduler=``
        keywords work too (they must name the model's own, or give it one)."""
        tag, load_module_strict = lightrft_load_args(tag, load_module_strict, kwargs)
        self._bind_ckpt_objects(model, kwargs)
        keep = not load_module_only
        path, extra = self._read_ckpt(model, load_dir, tag, strict=load_module_strict,
                                      optimizer_states=keep and load_optimizer_states,
                                      scheduler_states=keep and load_lr_scheduler_states, module_only=load_module_only)
        if keep:
            self.stepper(model).load_counters(extra.get("train_state", {}))
        return path, extra.get("client_state", {})

    def _read_ckpt(self, model: nn.Module, load_dir: str, tag: Optional[str], strict: bool, optimizer_states: bool,
                   scheduler_states: bool, module_only: bool) -> tuple[str, dict]:
        """Backend hook: read checkpoint ``tag`` of ``load_dir`` into ``model`` (its optimizer's and
        scheduler's states as asked). Returns the directory read and the extra state saved with it."""
        state = self.stepper(model)
        optimizer = state.optimizer if optimizer_states else None
        path = checkpoint.resolve(load_dir, tag)
        template = self._model_state(model, optimizer)
        extra = checkpoint.load(path, template)
        self._load_model_state(model, optimizer, template, strict=strict)
        if state.scheduler is not None and scheduler_states and extra["scheduler"]:
            state.scheduler.load_state_dict(extra["scheduler"])
        return path, extra

    def _bind_ckpt_objects(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        """``optimizer=`` / ``scheduler=`` of a checkpoint call: the model's own, or its first one."""
        state = self.stepper(model)
        optimizer, scheduler = kwargs.pop("optimizer", None), kwargs.pop("scheduler", None)
        if optimizer is not None:
            optimizer = unwrap_optimizer(optimizer)
            known = state.optimizer
            if known is None:
                state.optimizer = optimizer
            elif optimizer is not known and optimizer is not getattr(known, "optimizer", None):
                raise ValueError("save_ckpt/load_ckpt: optimizer= is not the optimizer this model trains with; accepted: "
                                 "the optimizer given to prepare/create_optimizer for it, or none")
        if scheduler is not None:
            if state.scheduler is not None and scheduler is not state.scheduler:
                raise ValueError("save_ckpt/load_ckpt: scheduler= is not the scheduler this model steps; accepted: the "
                                 "scheduler given to prepare/optimizer_step for it, or none")
            state.scheduler = scheduler

    def _model_state(self, model: nn.Module, optimizer: Optional[Optimizer]) -> dict[str, Any]:
        """Backend hook: the (sharded where sharded) state of a model and its optimizer for DCP."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, [optimizer] if optimizer is not None else [])
        return {"model": model_sd, "optimizer": optim_sd} if optimizer is not None else {"model": model_sd}

    def _load_model_state(self, model: nn.Module, optimizer: Optional[Optimizer], state: dict, strict: bool) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            [optimizer] if optimizer is not None else [],
            model_state_dict=state["model"],
            optim_state_dict=state.get("optimizer", {}),
            options=StateDictOptions(strict=strict),
        )

    def train_states_dict(self) -> dict[str, dict[str, Any]]:
        """The step counters of each model of the ``LightningModule`` this strategy trains, by submodule
        name, with the state of a scheduler the strategy steps that Lightning does not save. Stored
        once per Lightning checkpoint, under :data:`TRAIN_STATES`."""
        module = getattr(self, "lightning_module", None)
        if module is None:
            return {}
        lightning_schedulers = {id(c.scheduler) for c in getattr(self, "lr_scheduler_configs", [])}
        out = {}
        for name, sub in module.named_modules():
            state = self._train_states.get(id(sub))
            if state is not None:
                scheduler = state.scheduler if id(state.scheduler) not in lightning_schedulers else None
                out[name] = {**state.counters(), "scheduler": scheduler.state_dict() if scheduler is not None else None}
        return out

    def load_train_states_dict(self, states: dict[str, dict[str, Any]]) -> None:
        """Restore what :meth:`train_states_dict` returned into the models of the ``LightningModule``."""
        module = self.lightning_module
        for name, values in states.items():
            try:
                sub = module.get_submodule(name)
            except AttributeError:
                continue
            state = self.stepper(sub)
            state.load_counters(values)
            if values.get("scheduler") is not None and state.scheduler is not None:
                state.scheduler.load_state_dict(values["scheduler"])

    def save_checkpoint(self, checkpoint_dict: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Lightning's (``checkpoint_io`` writes it on rank 0), with :meth:`train_states_dict`."""
        checkpoint_dict[TRAIN_STATES] = self.train_states_dict()
        super().save_checkpoint(checkpoint_dict, filepath, storage_options=storage_options)  # type: ignore[misc]

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Lightning's, restoring the step counters :meth:`save_checkpoint` stored."""
        loaded = super().load_checkpoint(checkpoint_path, weights_only=weights_only)  # type: ignore[misc]
        self.load_train_states_dict(loaded.pop(TRAIN_STATES, {}))
        return loaded

    # ------------------------------------------------------------------ export
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full weights and persistent buffers of ``model`` as CPU tensors, on every rank (a
        collective where the strategy shards them)."""
        return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}

    def save_model(self, model: nn.Module, tokenizer: Any = None, output_dir: str = "", **kwargs: Any) -> None:
        """Export ``model``'s full weights (gathered where sharded) as a Hugging Face directory with
        safetensors (tied weights stay tied); rank 0 writes. ``kwargs`` go to ``save_pretrained``. A LoRA
        model writes its adapter directory instead, as LightRFT does (see :meth:`save_merged_model`)."""
        from lightrft_lightning.lora import has_lora, save_adapter

        module = self.unwrap_model(model)
        if not has_lora(module):
            return self.save_merged_model(model, tokenizer, output_dir, **kwargs)
        if kwargs:
            raise ValueError(f"save_model: {sorted(kwargs)} would be ignored by a LoRA adapter export; accepted: none")
        state = self.full_state_dict(module)
        if self.is_rank_0():
            save_adapter(module, state, output_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(output_dir)
        self._barrier()

    def save_merged_model(self, model: nn.Module, tokenizer: Any = None, output_dir: str = "", **kwargs: Any) -> None:
        """Export ``model`` as a plain Hugging Face directory (safetensors, tied weights written once): its
        full weights, gathered where sharded, with LoRA adapters merged into their base weights (the
        trained model is left unmerged). Rank 0 writes; ``kwargs`` go to ``save_pretrained``."""
        from lightrft_lightning.convert import tied_aliases
        from lightrft_lightning.lora import base_model, lora_scalings, merge_lora

        module = base_model(self.unwrap_model(model))
        aliases = tied_aliases(module)
        state = {k: v for k, v in self.full_state_dict(module).items() if k not in aliases}
        scalings = lora_scalings(module)
        if scalings:
            state = dict(merge_lora(list(state.items()), scalings))
        if self.is_rank_0():
            module.save_pretrained(output_dir, state_dict=state, safe_serialization=True, **kwargs)
            if tokenizer is not None:
                tokenizer.save_pretrained(output_dir)
        self._barrier()


def lightrft_load_args(tag: Any, strict: Any, kwargs: dict[str, Any]) -> tuple[Any, bool]:
    """LightRFT's FSDP ``load_ckpt(model, dir, optimizer, scheduler, ...)``: an optimizer in the ``tag``
    slot (and a scheduler in the next) become ``optimizer=`` / ``scheduler=``."""
    if hasattr(tag, "param_groups"):
        kwargs["optimizer"], tag = tag, None
        if not isinstance(strict, bool):
            kwargs["scheduler"], strict = strict, True
    return tag, strict


