"""Checkpoints of :class:`~lightrft_lightning.strategies.deepspeed.LightRFTDeepSpeed` (a mixin): LightRFT's
``save_ckpt`` / ``load_ckpt`` as each training engine's own DeepSpeed checkpoint, and Lightning's
``save_checkpoint`` / ``load_checkpoint`` as a DCP directory laid out as under ``LightRFTFSDP`` plus one DeepSpeed
checkpoint per training engine, written through the one checkpoint writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.optim import Optimizer

from lightrft_lightning import checkpoint
from lightrft_lightning.lora import has_lora
from lightrft_lightning.parallel import deepspeed as parallel_deepspeed
from lightrft_lightning.parallel.deepspeed_loading import weights_only_loads
from lightrft_lightning.strategies.checkpointing import TRAIN_STATES


class DeepSpeedCheckpointMixin:
    """The checkpoint hooks of ``LightRFTDeepSpeed``: its engines save and load their partitioned states."""

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
