"""`PPO`: actor-critic RLHF (GAE, value clipping) as a LightningModule (manual optimization)."""

from __future__ import annotations

import copy
import time
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightrft_lightning.algorithms.advantages import compute_advantages
from lightrft_lightning.algorithms.base import Experience, RLModule
from lightrft_lightning.strategies.base import enable_gradient_checkpointing
from lightrft_lightning.algorithms.losses import value_loss


class CriticModel(nn.Module):
    """A value head on a causal LM's backbone: one value per position, ``[N, L]``."""

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.model = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None) -> None:
        """Checkpoint the backbone's layers (the Hugging Face method's name, so strategies can call it)."""
        enable_gradient_checkpointing(self.model, gradient_checkpointing_kwargs)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the backbone recomputes its activations in the backward pass."""
        return bool(getattr(self.model, "gradient_checkpointing", False))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.value_head(hidden.float()).squeeze(-1)


class PPO(RLModule):
    """PPO with an actor, a critic (the actor's backbone plus a value head), an optional frozen reference
    and rule or reward-model rewards. Advantages by GAE on per-token rewards (the sequence reward on
    the last token minus ``kl_coef`` x KL on every token), whitened over all ranks.

    Args:
        critic_learning_rate: the critic's AdamW learning rate (its own optimizer, with the same
            learning-rate schedule as the actor's).
        clip_low, clip_high: policy ratio clip range ``[1 - clip_low, 1 + clip_high]``.
        value_clip: values move at most this far from the rollout's values (None: no clipping).
        gamma, lam: GAE discount and lambda.
        n_samples_per_prompt, kl_in_reward, advantage_estimator, advantages_norm: as in ``RLModule``, with
            PPO's defaults (1 sample, KL in the per-token reward, "gae", the only estimator PPO takes, and
            whitened advantages).
        **kwargs: the other arguments of :class:`~lightrft_lightning.algorithms.base.RLModule`.
    """

    advantage_estimators = ("gae",)

    def __init__(self, critic_learning_rate: float = 9e-6, clip_low: float = 0.2, clip_high: float = 0.2,
                 value_clip: Optional[float] = 0.2, gamma: float = 1.0, lam: float = 0.95,
                 n_samples_per_prompt: int = 1, kl_in_reward: bool = True, advantage_estimator: str = "gae",
                 advantages_norm: bool = True, **kwargs: Any) -> None:
        super().__init__(n_samples_per_prompt=n_samples_per_prompt, kl_in_reward=kl_in_reward,
                         advantage_estimator=advantage_estimator, advantages_norm=advantages_norm, **kwargs)
        self.clip_low, self.clip_high, self.value_clip = clip_low, clip_high, value_clip
        self.gamma, self.lam = gamma, lam
        self.critic = CriticModel(copy.deepcopy(self.actor.base_model), self.actor.config.hidden_size)
        if self.hparams.gradient_checkpointing:
            self.critic.gradient_checkpointing_enable()

    def _strategy_settings(self) -> dict[str, Any]:
        return {"critic_learning_rate": self.hparams.critic_learning_rate}

    def configure_optimizers(self) -> Any:
        """The actor's and the critic's AdamW, each with its learning-rate schedule."""
        actor = super().configure_optimizers()
        critic = self.trainer.strategy.create_optimizer(self.critic, lr=self.hparams.critic_learning_rate)
        return [actor["optimizer"], critic], [actor["lr_scheduler"], self.lr_scheduler_config(critic, "critic")]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        start = time.perf_counter()
        exp, rewards, metrics = self._rollout(batch)
        shaped = self._shape_rewards(rewards, exp, metrics)
        with torch.no_grad():
            self.critic.eval()
            exp.values = torch.cat([self.critic(mb.input_ids, mb.attention_mask)[:, :-1]
                                    for mb in self._micro_batches(exp, self.micro_rollout_batch_size)])
            self.critic.train()
        kl = self._kl(exp.old_logp, exp.ref_logp)
        exp.advantages, exp.returns = compute_advantages(
            "gae", shaped, exp.action_mask, hp.n_samples_per_prompt, kl=kl,
            kl_coef=hp.kl_coef if hp.kl_in_reward else 0.0, values=exp.values, gamma=self.gamma, lam=self.lam)
        self._shape_advantages(exp, rewards, metrics)
        if kl is not None:
            metrics["kl"] = (kl * exp.action_mask).sum() / exp.action_mask.sum()
        self._train_and_log(exp, rewards, metrics, start)

    def _train(self, exp: Experience) -> dict[str, Any]:
        hp = self.hparams
        strategy = self.trainer.strategy
        actor_opt, critic_opt = self.optimizers()
        actor_sched, critic_sched = self.lr_schedulers()
        sums = {"loss/policy": 0.0, "loss/value": 0.0, "clip_frac": 0.0, "entropy": 0.0}
        count = 0
        for t in self._policy_terms(exp):
            mb = t.mb
            strategy.backward(t.loss, self.actor, actor_opt)
            strategy.optimizer_step(actor_opt, self.actor, actor_sched, name="actor")
            values = self.critic(mb.input_ids, mb.attention_mask)[:, :-1]
            v_loss = value_loss(values, mb.values, mb.returns, mb.action_mask, self.value_clip, hp.loss_agg, **t.agg)
            strategy.backward(v_loss, self.critic, critic_opt)
            strategy.optimizer_step(critic_opt, self.critic, critic_sched, name="critic")
            sums["loss/policy"] += t.loss.item()
            sums["loss/value"] += v_loss.item()
            sums["clip_frac"] += t.clip_frac
            sums["entropy"] += t.entropy
            count += 1
        return {k: v / count for k, v in sums.items()}
