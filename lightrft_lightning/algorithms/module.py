"""`RLModule`: the learner. It takes a :class:`~lightrft_lightning.algorithms.rollout.Rollout` (prompt
rows to scored experience), :class:`~lightrft_lightning.algorithms.advantages.Advantages` and a loss
object, and owns what Lightning drives: optimizers and learning-rate schedules, the training step
(rollout, advantages, loss, optimizer steps) and metrics; its settings are in ``training.py``, its validation
in ``validation.py``."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightrft_lightning.algorithms.advantages import ESTIMATORS, Advantages
from lightrft_lightning.algorithms.experience import Experience
from lightrft_lightning.algorithms.log_probs import log_probs
from lightrft_lightning.algorithms.losses import ClippedPolicyLoss
from lightrft_lightning.algorithms.models import Policy, own_storage
from lightrft_lightning.algorithms.rollout import Rollout
from lightrft_lightning.algorithms.training import Training, check_lightrft_strategy, sync_strategy_config
from lightrft_lightning.algorithms.validation import ValidationMixin
from lightrft_lightning.engines.base import SamplingParams
from lightrft_lightning.lora import adapters_disabled, frozen_base_keys

log = logging.getLogger(__name__)
_GLOBAL_METRICS = ("reward", "reward_std", "adv", "adv_std")
class RLModule(ValidationMixin, pl.LightningModule):
    """The learner of the RLHF algorithms (manual optimization through the LightRFT strategy API),
    built from parts; :class:`~lightrft_lightning.algorithms.GRPO` and
    :class:`~lightrft_lightning.algorithms.PPO` build them from flat arguments.

    Each ``training_step`` takes a batch of prompt rows, gets scored experience from ``rollout``,
    scores the actor's (and the reference's) log-probs where the loss needs them, turns the rewards
    into advantages with ``advantages`` and optimizes ``loss`` as ``training`` says. Under a Trainer
    the module writes its batch sizes, ``rollout_batch_size`` (prompts per step x ranks, from the
    datamodule's ``batch_size``), ``micro_rollout_batch_size``, ``lr_warmup_ratio``,
    ``gradient_checkpointing``, the estimator and the shaping settings into ``trainer.strategy.config``
    at setup (:func:`sync_strategy_config`), so that the strategy and the module always agree.

    The strategy steps each learning-rate schedule with each real optimizer step (not on accumulation
    micro-steps, nor on steps skipped for a non-finite gradient norm); Lightning saves and restores it
    with the checkpoint.

    Args:
        loss: the algorithm's loss (:class:`~lightrft_lightning.algorithms.grpo.GRPOLoss`...).
        policy: the actor (and tokenizer) to train.
        rollout: prompt rows to scored experience.
        advantages: the advantage estimator and reward/advantage shaping.
        training: batch sizes, passes and the learning-rate schedule.
        val_samples: besides the greedy completion (``val/accuracy``), sample this many completions per
            validation prompt at ``val_temperature`` (``val/mean@n``); 0: greedy only.

    ``val/accuracy`` and ``val/mean@n`` are the mean score of the first reward in ``rollout.rewards``
    (a 0/1 correctness reward makes them accuracies); ``val/reward`` is the greedy weighted total.
    """

    advantage_estimators: tuple[str, ...] = tuple(e for e in ESTIMATORS if e != "gae")

    def __init__(self, loss: ClippedPolicyLoss, policy: Optional[Policy] = None, rollout: Optional[Rollout] = None,
                 advantages: Optional[Advantages] = None, training: Optional[Training] = None, val_samples: int = 0,
                 val_temperature: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "rollout", "advantages", "loss", "training"])
        owner = type(self).__name__
        self.policy = policy or Policy()
        self.rollout = rollout or Rollout()
        self.advantages = advantages or Advantages()
        self.loss = loss
        self.training_settings = training or Training()
        self.val_samples, self.val_temperature = val_samples, val_temperature
        self.loss.check(owner)
        self.rollout.check(owner)
        self.training_settings.check(owner)
        self.advantages.check(owner, self.advantage_estimators, self.rollout.n_samples_per_prompt,
                              self.rollout.max_new_tokens)
        if self.advantages.estimator == "cpgd" and self.loss.kl_in_reward and self.loss.kl_coef > 0:
            raise ValueError(f"{owner}.advantage_estimator='cpgd' uses the reward before any KL penalty, and "
                             "kl_in_reward=True; accepted: kl_in_reward=False (KL in the loss), or another estimator")
        if isinstance(val_samples, bool) or not isinstance(val_samples, int) or val_samples < 0:
            raise ValueError(f"{owner}.val_samples={val_samples!r} is invalid; accepted: an integer >= 0")
        if val_samples:
            SamplingParams(n=val_samples, temperature=val_temperature, max_new_tokens=self.rollout.max_new_tokens)
        elif val_temperature != 1.0:
            raise ValueError(f"{owner}.val_temperature={val_temperature!r} is only used with val_samples >= 1 (sampled "
                             "validation); accepted: val_samples >= 1, or the default 1.0")
        self.policy.check(owner)
        if self.rollout.off_policy and not self.loss.corrects_rollout:  # stale samples: importance weights by default
            self.loss.rollout_is = "token"
            log.info("%s: an off-policy rollout (%s) and no correction set: rollout_is='token' (truncated importance "
                     "sampling, cap rollout_is_threshold=%g)", owner, type(self.rollout).__name__,
                     self.loss.rollout_is_threshold)
        self.automatic_optimization = False
        self.tokenizer, self.actor, self.ref, self.lora = self.policy.build(self.loss.has_reference, owner)
        self.rollout.bind(self.tokenizer)
        for name, module in self.rollout.modules().items():
            self.add_module(name, module)

    @property
    def has_reference(self) -> bool:
        """Whether a KL reference is scored: a frozen copy of the actor, or a LoRA actor's own base."""
        return self.loss.has_reference

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.advantages.reward_running_norm:
            checkpoint["reward_running_moments"] = self.advantages.moments.state_dict()
        if self.lora is not None:  # adapters only: the frozen base is rebuilt from `model`
            frozen = frozen_base_keys(self)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._own_reference_storage()  # the checkpoint's reference weights must not land in the actor's tensors
        if "reward_running_moments" in checkpoint:
            self.advantages.moments.load_state_dict(checkpoint["reward_running_moments"])
        if self.lora is not None and "state_dict" in checkpoint:
            # an adapters-only checkpoint: the base keeps the weights it was built with
            state = checkpoint["state_dict"]
            frozen = frozen_base_keys(self) - state.keys()
            state.update({k: v for k, v in self.state_dict().items() if k in frozen})

    # ------------------------------------------------------------------ setup
    def on_fit_start(self) -> None:
        self._own_reference_storage()  # the strategy has sharded or copied what it trains: nothing shares now

    def _own_reference_storage(self) -> None:
        """The reference shares the actor's tensors from construction until the strategy's setup (see
        :func:`~lightrft_lightning.algorithms.models.frozen_view`); copy what still shares before training
        or a checkpoint writes to it."""
        if self.ref is not None:
            own_storage(self.ref, self.actor)

    def configure_callbacks(self) -> list[pl.Callback]:
        """Add a rollout-engine callback (an in-process HF engine) unless the Trainer has one, and the
        rollout's own callbacks."""
        from lightrft_lightning.callbacks import RolloutEngineCallback

        own = self.rollout.callbacks()
        if any(isinstance(cb, RolloutEngineCallback) for cb in self.trainer.callbacks):
            return own
        return [RolloutEngineCallback(pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id), *own]

    def setup(self, stage: str) -> None:
        strategy, owner = self.trainer.strategy, type(self).__name__
        check_lightrft_strategy(strategy, owner)
        if stage != "fit":
            return
        t, n = self.training_settings, self.rollout.n_samples_per_prompt
        world = strategy.dp_world_size
        prompts = getattr(self.trainer.datamodule, "batch_size", None)
        train_batch_size = t.train_batch_size
        if train_batch_size is None:
            if prompts is None:
                raise ValueError(f"{owner}.train_batch_size is None and the prompts' batch size is unknown (no "
                                 "datamodule with batch_size); accepted: an integer")
            train_batch_size = prompts * n * world
        # without a datamodule that knows its batch size, the config's rollout_batch_size says (checked per step)
        settings = {
            "rollout_batch_size": prompts * world if prompts is not None else strategy.config.rollout_batch_size,
            "micro_rollout_batch_size": t.scoring_batch_size,
            "lr_warmup_ratio": t.lr_warmup_ratio,
            "gradient_checkpointing": self.policy.gradient_checkpointing,
            **self.advantages.shaping_settings(),
            "advantage_estimator": self.advantages.estimator,
            **self._strategy_settings(),
        }
        sizes = {"micro_train_batch_size": t.micro_train_batch_size, "train_batch_size": train_batch_size,
                 "n_samples_per_prompt": n, "actor_learning_rate": t.actor_learning_rate,
                 "kl_estimator": self.loss.kl_estimator, "init_kl_coef": self.loss.kl_coef}
        config = sync_strategy_config(strategy, owner, settings, sizes)
        if prompts is not None:
            self._check_rollout_size(prompts * n, config.accumulation_steps(world))

    def _strategy_settings(self) -> dict[str, Any]:
        """Further ``StrategyConfig`` fields this module sets under a Trainer (a subclass's own)."""
        return {}

    def configure_optimizers(self) -> Any:
        """The actor's AdamW and its learning-rate schedule (see :meth:`lr_scheduler_config`)."""
        # under a Trainer the strategy wraps the module's children itself (shards them, or builds
        # DeepSpeed engines for them), frozen ones (reference, reward models) for inference
        optimizer = self.trainer.strategy.create_optimizer(self.actor, lr=self.training_settings.actor_learning_rate)
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_config(optimizer, "actor")}

    def lr_scheduler_config(self, optimizer: Optimizer, name: str) -> dict[str, Any]:
        """A Lightning scheduler config for ``optimizer``: warmup over ``lr_warmup_ratio`` of
        :meth:`num_optimizer_steps`, then ``lr_scheduler``. Under manual optimization Lightning saves and
        restores it but does not step it: :meth:`_backward_and_step` hands it to the strategy, which
        steps it after each real optimizer step (DeepSpeed: the engine does)."""
        from transformers.optimization import (get_constant_schedule_with_warmup,
                                               get_cosine_with_min_lr_schedule_with_warmup)

        t = self.training_settings
        total = self.num_optimizer_steps() if t.lr_scheduler == "cosine" or t.lr_warmup_ratio > 0 else 0
        warmup = math.ceil(total * t.lr_warmup_ratio)
        if t.lr_scheduler == "cosine":
            scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total,
                                                                    min_lr_rate=t.min_lr_ratio)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
        return {"scheduler": scheduler, "interval": "step", "name": f"{name}/lr"}

    def num_optimizer_steps(self) -> int:
        """Optimizer steps of each trained model over the fit: ``trainer.estimated_stepping_batches``
        (training steps: ``max_steps``, or epochs x batches) x the steps of one training step,
        ``epochs`` x ``rollout_batch_size`` x ``n_samples_per_prompt`` / ``train_batch_size`` (the
        sizes :meth:`setup` wrote into ``strategy.config``)."""
        t = self.training_settings
        steps = self.trainer.estimated_stepping_batches
        if steps == float("inf"):
            raise ValueError(f"{type(self).__name__}.lr_scheduler={t.lr_scheduler!r} with lr_warmup_ratio="
                             f"{t.lr_warmup_ratio!r} needs the number of training steps, and this Trainer has no end; "
                             "accepted: Trainer(max_steps=...) or max_epochs, or lr_scheduler='constant' with "
                             "lr_warmup_ratio=0")
        config = self.trainer.strategy.config
        per_step = t.epochs * config.rollout_batch_size * config.n_samples_per_prompt // config.train_batch_size
        return int(steps) * per_step

    # ------------------------------------------------------------------ training step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Rollout, log-probs, advantages, then ``epochs`` passes of the loss and its optimizer steps."""
        start = time.perf_counter()
        rows = batch["rows"]
        self._check_prompts_per_step(len(rows))
        exp, metrics = self.rollout(self, rows)
        score_start = time.perf_counter()
        self._score_rollout(exp)
        metrics["time/score"] = metrics.get("time/score", 0.0) + time.perf_counter() - score_start
        shaped = self.advantages.shape_rewards(exp.rewards, exp.action_mask.sum(dim=1), self.rollout.max_new_tokens,
                                               metrics, self._all_reduce_sum)
        kl = self._estimate_advantages(exp, shaped)
        self.advantages.shape_advantages(exp, exp.rewards, self.rollout.n_samples_per_prompt, metrics,
                                         self._all_reduce_sum)
        if kl is not None:
            metrics["kl"] = (kl * exp.action_mask).sum() / exp.action_mask.sum()
        train_start = time.perf_counter()
        metrics.update(self._train(exp))
        end = time.perf_counter()
        tokens = exp.action_mask.sum()
        metrics.update(self._stats("reward", exp.rewards, torch.ones_like(exp.rewards)))
        metrics.update(self._stats("adv", exp.advantages, exp.action_mask))
        metrics.update({"response_length": tokens / len(exp), "time/train": end - train_start,
                        "perf/tokens_per_s": tokens / (end - start)})
        self._log_metrics(metrics)

    @torch.no_grad()
    def _score_rollout(self, exp: Experience) -> None:
        """The rollout policy's log-probs (unless the training forward gives them: :meth:`_on_policy`)
        and the reference's."""
        if not self._on_policy(len(exp)):
            self.actor.eval()
            exp.old_logp = self._score(exp, self.actor)
            self.actor.train()
        if self.ref is not None:
            exp.ref_logp = self._score(exp, self.ref)
        elif self.has_reference:
            self.actor.eval()
            try:
                with adapters_disabled(self.actor):  # a LoRA actor's base
                    exp.ref_logp = self._score(exp, self.actor)
            finally:
                self.actor.train()

    def _estimate_advantages(self, exp: Experience, rewards: Tensor) -> Optional[Tensor]:
        """``exp.advantages`` and ``exp.returns`` from the shaped sequence ``rewards``; returns the
        per-token KL put into the reward (logged), or None."""
        kl = self.loss.kl(exp.old_logp, exp.ref_logp) if self.loss.kl_in_reward else None
        exp.advantages, exp.returns = self.advantages.estimate(
            rewards, exp.action_mask, self.rollout.n_samples_per_prompt, kl=kl, kl_coef=self.loss.kl_coef,
            reduce=self._all_reduce_sum)
        return kl

    def _train(self, exp: Experience) -> dict[str, float]:
        """Every micro-batch of every pass through :meth:`_train_micro_batch`; the mean of its metrics
        (the largest value of those named ``*_max``)."""
        sums: dict[str, float] = defaultdict(float)
        count = 0
        for mb, agg in self._loss_batches(exp):
            for key, value in self._train_micro_batch(mb, agg).items():
                sums[key] = max(sums.get(key, value), value) if key.endswith("_max") else sums[key] + value
            count += 1
        return {k: v if k.endswith("_max") else v / count for k, v in sums.items()}

    def _train_micro_batch(self, mb: Experience, agg: dict[str, Any]) -> dict[str, float]:
        """The actor's forward, ``loss`` and (accumulated) optimizer step on one micro-batch."""
        logp, mask, entropy = self._actor_forward(mb)
        loss, metrics = self.loss(logp, mb, mask, **agg)
        self._backward_and_step(loss, self.actor, self.optimizers(), self.lr_schedulers(), "actor")
        return {**metrics, "entropy": entropy}

    def _backward_and_step(self, loss: Tensor, model: nn.Module, optimizer: Any, scheduler: Any, name: str) -> None:
        """The one place the algorithms reach the optimizer, through Lightning's manual optimization
        (``manual_backward``, ``optimizer.step()``) with the strategy's :class:`~lightrft_lightning.parallel.stepper.Stepper`
        of ``model``: the optimizer steps once per ``train_batch_size`` samples (accumulating before), clipped
        to ``max_norm``, skipped on a non-finite norm, and the scheduler steps with it."""
        stepper = self.trainer.strategy.stepper(model, optimizer, scheduler, name)
        self.manual_backward(loss, stepper=stepper)
        optimizer.step(stepper=stepper)

    def _loss_batches(self, exp: Experience) -> Iterator[tuple[Experience, dict[str, Any]]]:
        """Each micro-batch of each pass, with the aggregation arguments of ``loss.loss_agg`` that make the
        accumulated micro-batch losses add up to the optimizer step's loss."""
        t = self.training_settings
        accumulation = self.trainer.strategy.accumulation_steps
        normalizer = self._token_normalizer(exp) if self.loss.loss_agg == "token" else None
        for _ in range(t.epochs):
            for i, mb in enumerate(exp.micro_batches(t.micro_train_batch_size)):
                agg: dict[str, Any] = {}
                if normalizer is not None:
                    agg["num_tokens"] = normalizer[i // accumulation]
                elif self.loss.loss_agg == "constant":
                    agg["max_len"] = self.rollout.max_new_tokens
                yield mb, agg

    def _actor_forward(self, mb: Experience) -> tuple[Tensor, Tensor, float]:
        """The actor's log-probs on ``mb``, the response mask the loss takes, and the mean entropy.

        Without a reference model the loss is the clipped term alone, so samples whose advantage is 0
        on every token are not forwarded (their log-probs are 0; entropy and clip fraction are over
        the samples trained): the loss and its gradient are the same."""
        mask = mb.action_mask if self.has_reference else with_advantage(mb.action_mask, mb.advantages)
        logp, entropy = self.log_probs(self.actor, mb.input_ids, mb.attention_mask, entropy=True, action_mask=mask)
        return logp, mask, ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()

    def log_probs(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, entropy: bool = False,
                  action_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """:func:`~lightrft_lightning.algorithms.log_probs.log_probs` at the rollout's temperature."""
        return log_probs(model, input_ids, attention_mask, self.rollout.temperature, entropy, action_mask)

    @torch.no_grad()
    def _score(self, exp: Experience, model: nn.Module) -> Tensor:
        return torch.cat([self.log_probs(model, mb.input_ids, mb.attention_mask, action_mask=mb.action_mask)[0]
                          for mb in exp.micro_batches(self.training_settings.scoring_batch_size)])

    def _on_policy(self, samples: int) -> bool:
        """One pass and one optimizer step per rollout: the rollout policy is the policy being
        trained, so its log-probs are the detached ones of the training forward (one forward saved)."""
        kl_in_reward = self.has_reference and self.loss.kl_in_reward
        t = self.training_settings
        return (t.epochs == 1 and not kl_in_reward
                and samples == self.trainer.strategy.accumulation_steps * t.micro_train_batch_size)

    def _check_prompts_per_step(self, prompts: int) -> None:
        strategy = self.trainer.strategy
        expected = strategy.config.rollout_batch_size
        if prompts * strategy.dp_world_size != expected:
            raise ValueError(f"this step has {prompts} prompts x {strategy.dp_world_size} ranks, but "
                             f"StrategyConfig.rollout_batch_size={expected} (the length of the learning-rate schedule "
                             f"counts on it); accepted: batches of rollout_batch_size / ranks prompts (a datamodule "
                             f"with a batch_size sets it)")

    def _check_rollout_size(self, samples: int, accumulation: int) -> int:
        step_size = accumulation * self.training_settings.micro_train_batch_size
        if samples % step_size:
            raise ValueError(f"a rollout of {samples} samples per rank does not split into optimizer steps of "
                             f"{step_size} (micro_train_batch_size x accumulation); accepted: a train_batch_size "
                             "that divides prompts per step x n_samples_per_prompt x ranks")
        return step_size

    def _token_normalizer(self, exp: Experience) -> Tensor:
        """Tokens per micro-batch over the optimizer step, so that summing micro-batch losses (as the
        strategy does, after dividing by accumulation steps and averaging over ranks) gives the
        exact token mean of the step."""
        strategy = self.trainer.strategy
        accumulation = strategy.accumulation_steps
        step_size = self._check_rollout_size(len(exp), accumulation)
        counts = exp.action_mask.view(-1, step_size, exp.action_mask.shape[1]).sum(dim=(1, 2))
        counts = self._all_reduce_sum(counts).clamp(min=1)  # dynamic sampling may mask a whole step
        return counts / (accumulation * strategy.dp_world_size)

    # ------------------------------------------------------------------ metrics
    def _all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return self.trainer.strategy.all_reduce(tensor, op="sum")

    def _stats(self, name: str, x: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Mean and std of the masked entries of ``x`` over all ranks (``name`` and ``name_std``)."""
        s = self._all_reduce_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).float())
        mean = s[0] / s[2]
        return {name: mean, f"{name}_std": (s[1] / s[2] - mean**2).clamp(min=0).sqrt()}

    def _log_metrics(self, metrics: dict[str, Any]) -> None:
        """Log ``metrics`` (the mean over ranks, the largest value for those named ``*_max``; reward and
        advantage stats are already global)."""
        values = {k: float(v) for k, v in metrics.items()}
        local = {k: v for k, v in values.items() if k not in _GLOBAL_METRICS}
        for op, names in (("mean", [k for k in local if not k.endswith("_max")]),
                          ("max", [k for k in local if k.endswith("_max")])):
            if names:
                values.update(self.trainer.strategy.all_reduce({k: local[k] for k in names}, op=op))
        for key, value in values.items():
            self.log(key, value, prog_bar=key in ("reward", "kl"), batch_size=1)


def with_advantage(action_mask: Tensor, advantages: Tensor) -> Tensor:
    """``action_mask`` without the samples whose advantage is 0 on every token, which add exactly 0 to
    the clipped policy loss and its gradient (a GRPO group whose rewards all tie): their forward is
    skipped. One sample stays when no other would, so that the micro-batch still has a backward."""
    trained = ((advantages != 0) & action_mask.bool()).any(1)
    if not trained.any():
        trained = action_mask.bool().any(1)
        trained &= trained.cumsum(0) == 1
    return action_mask * trained[:, None].to(action_mask.dtype)
