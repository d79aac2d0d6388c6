"""The learner's training settings (:class:`Training`: batching, optimization passes, the learning-rate
schedule) and how a module's settings meet the strategy's config under a Trainer (:func:`sync_strategy_config`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from lightrft_lightning.config import StrategyConfig
from lightrft_lightning.strategies.base import StrategyBase

LR_SCHEDULERS = ("constant", "cosine")
DEFAULT_MIN_LR_RATIO = 0.1


@dataclass
class Training:
    """Batching, optimization passes and the learning-rate schedule.

    Each ``training_step`` runs ``epochs`` passes of micro-batches of ``micro_train_batch_size`` samples
    over its rollout; the strategy accumulates gradients and steps the optimizer every
    ``train_batch_size`` samples (over all ranks; None: once per pass). Each optimizer gets a schedule
    over the optimizer steps of the fit: a linear warmup from 0 over ``lr_warmup_ratio`` of them
    (rounded up), then a constant rate or a cosine decay to ``min_lr_ratio`` x the rate.

    Args:
        micro_train_batch_size: samples per forward/backward.
        train_batch_size: samples per optimizer step over all ranks (None: a whole rollout).
        epochs: optimization passes over each rollout.
        micro_rollout_batch_size: samples per no-grad forward when scoring a rollout (the actor's and
            reference's log-probs, PPO's values); None: ``micro_train_batch_size``. The engine gets
            the whole rollout in one call.
        actor_learning_rate: AdamW learning rate of the policy.
        lr_scheduler: "constant" or "cosine" (decay to ``min_lr_ratio`` x the learning rate), after warmup.
        lr_warmup_ratio: the fraction of the optimizer steps with a linear warmup from 0.
        min_lr_ratio: where the cosine ends, as a fraction of the learning rate ("cosine" only).
    """

    micro_train_batch_size: int = 8
    train_batch_size: Optional[int] = None
    epochs: int = 1
    micro_rollout_batch_size: Optional[int] = None
    actor_learning_rate: float = 1e-6
    lr_scheduler: str = "constant"
    lr_warmup_ratio: float = 0.0
    min_lr_ratio: float = DEFAULT_MIN_LR_RATIO

    def check(self, owner: str) -> None:
        """Raise on a bad field, naming it as ``owner.field``."""
        counts = {"micro_train_batch_size": self.micro_train_batch_size, "epochs": self.epochs}
        if self.train_batch_size is not None:
            counts["train_batch_size"] = self.train_batch_size
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}.{name}={value!r} is invalid; accepted: an integer >= 1")
        value = self.actor_learning_rate
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"{owner}.actor_learning_rate={value!r} is invalid; accepted: a number >= 0 (finite)")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"{owner}.lr_scheduler={self.lr_scheduler!r} is invalid; accepted: "
                             f"{', '.join(LR_SCHEDULERS)}")
        for name in ("lr_warmup_ratio", "min_lr_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{owner}.{name}={value!r} is invalid; accepted: a number in [0, 1]")
        if self.lr_scheduler != "cosine" and self.min_lr_ratio != DEFAULT_MIN_LR_RATIO:
            raise ValueError(f"{owner}.min_lr_ratio={self.min_lr_ratio!r} is only used by lr_scheduler='cosine', and "
                             f"lr_scheduler={self.lr_scheduler!r}; accepted: lr_scheduler='cosine', or min_lr_ratio "
                             f"left at {DEFAULT_MIN_LR_RATIO}")
        size = self.micro_rollout_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{owner}.micro_rollout_batch_size={size!r} is invalid; accepted: None or an integer >= 1")

    @property
    def scoring_batch_size(self) -> int:
        """Samples per no-grad scoring forward of a rollout."""
        return self.micro_rollout_batch_size or self.micro_train_batch_size


def check_lightrft_strategy(strategy: Any, owner: str) -> None:
    """Refuse a strategy without the LightRFT API (``owner`` names the module in the message)."""
    if not isinstance(strategy, StrategyBase):
        raise ValueError(f"{owner} needs a LightRFT strategy, got {type(strategy).__name__}; "
                         "accepted: 'lightrft_fake', 'lightrft_fsdp', 'lightrft_deepspeed' or a StrategyBase subclass")


def sync_strategy_config(strategy: StrategyBase, owner: str, settings: dict[str, Any],
                         sizes: dict[str, Any]) -> StrategyConfig:
    """Make ``strategy.config`` (what LightRFT's trainers read) hold the module's values under a Trainer.

    Refuses a config that gives one of ``settings`` a value that is neither the default nor the module's
    (it would be overwritten silently); ``sizes`` are written without that check. Returns the new config."""
    defaults = {f.name: f.default for f in dataclasses.fields(StrategyConfig)}
    for name, value in settings.items():
        given = getattr(strategy.config, name)
        if given != defaults[name] and given != value:
            source = "prompts per step x ranks" if name == "rollout_batch_size" else f"{owner}.{name}"
            raise ValueError(f"StrategyConfig.{name}={given!r} (the strategy's config) disagrees with the "
                             f"module's {value!r} ({source}), which is the one used under a Trainer; accepted: "
                             f"{value!r} or the default {defaults[name]!r}")
    # the module's sizes are the ones the strategy accumulates with (and DeepSpeed is configured with)
    strategy.config = dataclasses.replace(strategy.config, **sizes, **settings)
    steps = strategy.config.accumulation_steps(strategy.dp_world_size)  # raises if the sizes do not divide
    if strategy.accumulation_steps != steps:
        raise ValueError(f"{type(strategy).__name__} accumulates {strategy.accumulation_steps} micro-batches, not the "
                         f"{steps} of the module's batch sizes; build the strategy with a config "
                         "(trainer.strategy.init_args.config) so that it follows StrategyConfig")
    return strategy.config
