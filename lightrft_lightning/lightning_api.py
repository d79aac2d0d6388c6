"""The one place where lightrft-lightning reaches into Lightning's private API.

Each function names what it needs from Lightning; when Lightning changes, this module changes and the
strategies, callbacks and algorithms do not.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
from lightning.fabric.strategies.deepspeed import _DEEPSPEED_AVAILABLE as DEEPSPEED_AVAILABLE

__all__ = [
    "DEEPSPEED_AVAILABLE",
    "in_hook",
    "can_log",
    "should_update_logs",
    "before_optimizer_step",
    "manual_step_progress",
    "one_global_step",
    "resuming_from_checkpoint",
    "restore_modules_and_callbacks",
    "unwrap_optimizer",
    "share_device_mesh",
    "given_precision_plugin",
    "set_precision_plugin",
    "set_process_group_backend",
    "join_process_group",
    "join_deepspeed_process_group",
    "callback_state_key",
    "strategy_device_mesh",
    "set_strategy_device_mesh",
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


@contextlib.contextmanager
def one_global_step(trainer: "pl.Trainer") -> Iterator[None]:
    """Under manual optimization, make ``global_step`` move by exactly one over the block, however many
    optimizers stepped inside it (Lightning #17958 counts each ``optimizer.step()``)."""
    progress = manual_step_progress(trainer)
    target = progress.total.completed + 1
    yield
    delta = target - progress.total.completed
    for tracker in (progress.total, progress.current):
        tracker.ready += delta
        tracker.completed += delta


def resuming_from_checkpoint(trainer: "pl.Trainer") -> bool:
    """Whether this fit already restores a checkpoint (``fit(ckpt_path=...)``)."""
    return bool(trainer._checkpoint_connector._loaded_checkpoint or trainer.ckpt_path)


def restore_modules_and_callbacks(trainer: "pl.Trainer", path: str) -> None:
    """Load the checkpoint at ``path`` into the model and the callbacks; the Trainer then restores the
    loops, optimizers and schedulers from it, as for ``fit(ckpt_path=path)``."""
    trainer._checkpoint_connector._restore_modules_and_callbacks(path)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind a Lightning ``LightningOptimizer`` (or the optimizer itself)."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def share_device_mesh(module: pl.LightningModule, mesh: Any) -> None:
    """Make ``module.device_mesh`` return ``mesh`` (as Lightning's ``ModelParallelStrategy`` does)."""
    module._device_mesh = mesh


def given_precision_plugin(strategy: Any) -> Any:
    """The precision plugin the Trainer (or the user) gave ``strategy``, or None (where the public
    ``strategy.precision_plugin`` returns a default ``Precision()``)."""
    return strategy._precision_plugin


def set_precision_plugin(strategy: Any, plugin: Any) -> None:
    """Store ``plugin`` as ``strategy``'s precision plugin (what the public setter does)."""
    strategy._precision_plugin = plugin


def set_process_group_backend(strategy: Any, backend: str) -> None:
    """The backend a Lightning ``DDPStrategy``-like strategy joins its process group with, unless one was given."""
    if strategy._process_group_backend is None:
        strategy._process_group_backend = backend


def join_process_group(strategy: Any) -> None:
    """Join the process group as a Lightning ``ParallelStrategy`` does in its ``setup_environment``
    (ranks from the cluster environment, the strategy's backend and timeout)."""
    strategy._setup_distributed()


def join_deepspeed_process_group(strategy: Any) -> None:
    """Join the process group through ``deepspeed.init_distributed`` as Lightning's ``DeepSpeedStrategy`` does
    (its node environment variables, the strategy's backend)."""
    strategy._init_deepspeed_distributed()


def callback_state_key(callback: Any, **key: Any) -> str:
    """A callback's ``state_key`` from ``key`` (the arguments that tell two instances apart), as Lightning's
    own callbacks build theirs."""
    return callback._generate_state_key(**key)


def strategy_device_mesh(strategy: Any) -> Any:
    """``strategy.device_mesh`` of a ``ModelParallelStrategy``, or None before it is built."""
    return strategy._device_mesh


def set_strategy_device_mesh(strategy: Any, mesh: Any) -> None:
    """Make ``strategy.device_mesh`` (``ModelParallelStrategy``'s) return ``mesh``."""
    strategy._device_mesh = mesh
