"""`DCPCheckpoint`: periodic, atomic, rotating checkpoints through the strategy, with automatic
resume from ``latest`` and exact RNG restore."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.strategies import Strategy

from lightrft_lightning import checkpoint, lightning_api
from lightrft_lightning.strategies.base import StrategyBase

log = logging.getLogger(__name__)

_TAG = re.compile(r"global_step(\d+)")


class DCPCheckpoint(Checkpoint):
    """Save the whole training state every ``every_n_train_steps`` steps and at the end of training
    into ``dirpath/global_step<N>``, and resume from ``dirpath/latest`` when ``fit`` starts.

    The strategy writes the files: DCP directories under ``LightRFTFSDP`` and single-process
    strategies (``LightRFTFake``, through :class:`~lightrft_lightning.checkpoint.DCPCheckpointIO`),
    the same DCP directory plus DeepSpeed's own per-engine checkpoints under ``LightRFTDeepSpeed``,
    all through the one checkpoint writer (:mod:`lightrft_lightning.checkpoint.publish`): a checkpoint
    is written into a hidden directory and renamed once every rank is done; ``latest`` moves only
    after that, so a crash mid-save leaves the previous checkpoint and ``latest`` untouched.

    Saved and restored: every model and optimizer, the schedulers, the loops' step counters, the
    strategy's step counters (stored by the strategy), the datamodule's state (the prompt sampler position of
    ``PromptDataModule``) and each rank's torch, numpy and python RNG states. The RNG states are
    applied just before the first training step after resuming (before the next epoch's DataLoader
    iterator draws its seed when the save ended an epoch), so a resumed run draws the same numbers
    as an uninterrupted one. After a resume
    the rollout engine gets the restored weights on its next generation, as after any step.

    Args:
        dirpath: the checkpoint directory (created if missing).
        every_n_train_steps: save when ``trainer.global_step`` is a multiple of it; 0 saves only at the end.
        max_num: keep at most this many checkpoints (the one resumed from is never deleted).
        max_mem: keep at most this many GB of checkpoints.
        save_on_train_end: save when training ends (unless this step was just saved).
        resume: resume from ``dirpath/latest`` when ``fit`` starts without ``ckpt_path``.
        async_save: write with ``torch.distributed.checkpoint.async_save`` while training goes on;
            the next save (and the end of training) waits for the previous one. DCP strategies only.
    """

    def __init__(
        self,
        dirpath: Union[str, os.PathLike],
        every_n_train_steps: int = 100,
        max_num: int = 3,
        max_mem: float = 1000,
        save_on_train_end: bool = True,
        resume: bool = True,
        async_save: bool = False,
    ) -> None:
        if not isinstance(dirpath, (str, os.PathLike)) or not str(dirpath):
            raise TypeError(f"DCPCheckpoint.dirpath must be a non-empty path, got {dirpath!r}")
        for name, value in (("every_n_train_steps", every_n_train_steps), ("max_num", max_num)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "every_n_train_steps" else 1):
                raise ValueError(f"DCPCheckpoint.{name}={value!r} is invalid; accepted: an integer >= "
                                 f"{0 if name == 'every_n_train_steps' else 1}")
        if isinstance(max_mem, bool) or not isinstance(max_mem, (int, float)) or not max_mem > 0:
            raise ValueError(f"DCPCheckpoint.max_mem={max_mem!r} is invalid; accepted: a number of GB > 0")
        for name, value in (("save_on_train_end", save_on_train_end), ("resume", resume), ("async_save", async_save)):
            if not isinstance(value, bool):
                raise TypeError(f"DCPCheckpoint.{name} must be a bool, got {value!r}")
        self.dirpath = Path(dirpath)
        if self.dirpath.exists() and not self.dirpath.is_dir():
            raise NotADirectoryError(f"DCPCheckpoint.dirpath={str(dirpath)!r} is a file; accepted: a directory")
        self.every_n_train_steps = every_n_train_steps
        self.max_num = max_num
        self.max_mem = max_mem
        self.save_on_train_end = save_on_train_end
        self.resume = resume
        self.async_save = async_save
        self.resumed_from: Optional[str] = None
        self.last_saved: Optional[str] = None
        self._last_step: Optional[int] = None
        self._pending: Optional[checkpoint.SaveHandle] = None
        self._pending_tag: Optional[str] = None
        self._to_restore: Optional[dict[str, Any]] = None
        self._trainer: Optional[pl.Trainer] = None

    @property
    def state_key(self) -> str:
        return lightning_api.callback_state_key(self, dirpath=str(self.dirpath))

    # ------------------------------------------------------------------ setup and resume
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit":
            return
        strategy = trainer.strategy
        if _writes_through_checkpoint_io(strategy) and type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = checkpoint.DCPCheckpointIO()
        through_io = _writes_through_checkpoint_io(strategy)
        writes_ours = (isinstance(strategy.checkpoint_io, checkpoint.DCPCheckpointIO) if through_io
                       else isinstance(strategy, StrategyBase))
        if not writes_ours:
            raise ValueError(
                f"DCPCheckpoint: {type(strategy).__name__} with checkpoint_io {type(strategy.checkpoint_io).__name__} "
                "does not write through lightrft_lightning.checkpoint; accepted: LightRFTFake, LightRFTFSDP, "
                "LightRFTDeepSpeed, or a strategy whose checkpoint_io is DCPCheckpointIO")
        if self.async_save and not (through_io or _is_dcp_strategy(strategy)):
            raise ValueError(
                f"DCPCheckpoint(async_save=True) needs a strategy that writes DCP (LightRFTFake, LightRFTFSDP); "
                f"{type(strategy).__name__} writes its own format synchronously; accepted: async_save=False"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.resume or lightning_api.resuming_from_checkpoint(trainer):
            return  # an explicit fit(ckpt_path=...) wins
        tag = checkpoint.read_latest(self.dirpath)
        if tag is None:
            return
        path = self.dirpath / tag
        if not path.is_dir():
            raise FileNotFoundError(f"DCPCheckpoint: {self.dirpath / checkpoint.LATEST} names {tag!r} but {path} "
                                    "does not exist; accepted: remove the latest file or restore the checkpoint")
        rank_zero_log(trainer, f"DCPCheckpoint: resuming from {path}")
        # Lightning restores loops, optimizers and schedulers from what this loads, right after this hook
        lightning_api.restore_modules_and_callbacks(trainer, str(path))
        self.resumed_from = tag
        self._last_step = trainer.global_step
        if self._to_restore is not None and self._to_restore.get("at_epoch_end"):
            # the next epoch's DataLoader iterator is created (and draws from the torch RNG) before
            # its first batch, as in the uninterrupted run: restore the RNG before that
            rng = self._to_restore.pop("rng")
            _set_rng_state(rng[_rank() % len(rng)])

    def state_dict(self) -> dict[str, Any]:
        """Every rank's RNG states (gathered: this runs on every rank while saving) and whether the
        save ended an epoch. The strategy stores its step counters itself."""
        rng = _rng_state()
        if dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        trainer = self._trainer
        at_epoch_end = trainer is not None and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        return {"rng": states, "at_epoch_end": at_epoch_end}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._to_restore is None:
            return
        state, self._to_restore = self._to_restore, None
        if state.get("rng"):
            _set_rng_state(state["rng"][_rank() % len(state["rng"])])

    # ------------------------------------------------------------------ saving
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        periodic = self.every_n_train_steps and step % self.every_n_train_steps == 0
        if (periodic or (self.save_on_train_end and _is_last_step(trainer))) and step != self._last_step:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # training stopped early (EarlyStopping, should_stop): a resume starts the next epoch
        if self.save_on_train_end and trainer.global_step != self._last_step:
            self.save(trainer)
        self.wait()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.world_size > 1:
            return  # finishing a save takes every rank; the previous checkpoint stays the latest
        try:  # a save whose files are complete is still worth keeping
            self.wait()
        except Exception as err:  # the original exception is the one to raise
            log.error("DCPCheckpoint: the pending save failed too: %s", err)

    def save(self, trainer: pl.Trainer) -> str:
        """Save now as ``global_step<N>`` (every rank must call it). Returns the final path."""
        self.wait()
        step = trainer.global_step
        tag = f"global_step{step}"
        if trainer.is_global_zero:
            checkpoint.remove_partial(self.dirpath)  # left by a run that died mid-save
        options = checkpoint.Publish(
            latest=True, max_num=self.max_num, max_mem=self.max_mem,
            keep={self.resumed_from} if self.resumed_from else set(),
            is_checkpoint=lambda p: _TAG.fullmatch(p.name) is not None, async_save=self.async_save)
        trainer.save_checkpoint(self.dirpath / tag, storage_options=options)
        self._pending, self._pending_tag = options.handle, tag
        if not self.async_save:
            self.wait()
        self._last_step = step
        return str(self.dirpath / tag)

    def wait(self) -> None:
        """Finish the pending save, if any (every rank must call it)."""
        handle, tag = self._pending, self._pending_tag
        self._pending = self._pending_tag = None
        if tag is None:
            return
        if handle is not None:  # None on the ranks of a strategy that writes from rank 0 alone
            handle.wait()
        self.last_saved = tag
        if self._trainer is not None:
            rank_zero_log(self._trainer, f"DCPCheckpoint: saved {self.dirpath / tag}")


def rank_zero_log(trainer: pl.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        log.info(message)


def _is_last_step(trainer: pl.Trainer) -> bool:
    """Whether the step that just ended is the last one (``max_steps``, or the last batch of the
    last epoch). Saving here rather than in ``on_train_end`` keeps the loops mid-epoch, so a resume
    with a larger ``max_steps`` continues the same epoch."""
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return (trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and max_epochs not in (None, -1)
            and trainer.current_epoch + 1 >= max_epochs)


def _writes_through_checkpoint_io(strategy: Strategy) -> bool:
    """Strategies whose ``save_checkpoint`` is Lightning's (one process writes through ``checkpoint_io``)."""
    return type(strategy).save_checkpoint in (Strategy.save_checkpoint, StrategyBase.save_checkpoint)


def _is_dcp_strategy(strategy: Strategy) -> bool:
    from lightrft_lightning.strategies.fsdp import LightRFTFSDP

    return isinstance(strategy, LightRFTFSDP)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
