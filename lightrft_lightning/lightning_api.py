"""The one place where lightrft-lightning reaches into Lightning's private API.

Each function names what it needs from Lightning; when Lightning changes, this module changes and the
strategies, callbacks and algorithms do not.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.fabric.strategies.deepspeed import _DEEPSPEED_AVAILABLE as DEEPSPEED_AVAILABLE
from lightning.fabric.utilities.optimizer import _optimizers_to_device as optimizers_to_device
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers as init_optimizers_and_lr_schedulers

__all__ = [
    "DEEPSPEED_AVAILABLE",
    "optimizers_to_device",
    "init_optimizers_and_lr_schedulers",
    "in_hook",
    "can_log",
    "should_update_logs",
    "before_optimizer_step",
    "manual_step_progress",
    "resuming_from_checkpoint",
    "restore_modules_and_callbacks",
    "given_precision",
]


def in_hook(module: Optional[pl.LightningModule]) -> bool:
    """Whether ``module`` is attached to a Trainer that is running one of its hooks (so ``self.log``
    and the Trainer's callbacks are available)."""
    return module is not None and module._trainer is not None and module._current_fx_name is not None


def can_log(module: Optional[pl.LightningModule]) -> bool:
    """Whether ``module.log`` is allowed in the hook running now (not, e.g., in ``on_train_end``)."""
    from lightning.pytorch.trainer.connectors.logger_connector.fx_validator import _FxValidator

    return in_hook(module) and _FxValidator.functions.get(module._current_fx_name) is not None


def should_update_logs(trainer: "pl.Trainer") -> bool:
    """Whether this step is one where Lightning writes to its loggers (``log_every_n_steps``)."""
    return trainer._logger_connector.should_update_logs


def before_optimizer_step(precision_plugin: Any, module: pl.LightningModule, optimizer: Any) -> None:
    """Run ``on_before_optimizer_step`` of the callbacks and the module (and, under automatic
    optimization, the Trainer's gradient clipping), as Lightning does right before ``optimizer.step``."""
    precision_plugin._after_closure(module, optimizer)


def manual_step_progress(trainer: "pl.Trainer") -> Any:
    """The progress tracker whose ``total.completed`` is ``global_step`` under manual optimization."""
    return trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress


def resuming_from_checkpoint(trainer: "pl.Trainer") -> bool:
    """Whether this fit already restores a checkpoint (``fit(ckpt_path=...)``)."""
    return bool(trainer._checkpoint_connector._loaded_checkpoint or trainer.ckpt_path)


def restore_modules_and_callbacks(trainer: "pl.Trainer", path: str) -> None:
    """Load the checkpoint at ``path`` into the model and the callbacks; the Trainer then restores the
    loops, optimizers and schedulers from it, as for ``fit(ckpt_path=path)``."""
    trainer._checkpoint_connector._restore_modules_and_callbacks(path)


def given_precision(strategy: Any) -> Optional[str]:
    """The precision flag of the plugin a Trainer (or the caller) gave ``strategy``; ``None`` when it was
    given none (a standalone strategy, whose ``precision_plugin`` is a default ``Precision()``)."""
    plugin = getattr(strategy, "_precision_plugin", None)
    return None if plugin is None else str(plugin.precision)
