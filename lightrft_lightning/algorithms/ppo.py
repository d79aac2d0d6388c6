"""`PPO`: actor-critic RLHF (GAE, value clipping): its loss, the critic, and the module built from flat arguments."""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightrft_lightning.algorithms.experience import Experience
from lightrft_lightning.algorithms.flat import flat_parts
from lightrft_lightning.algorithms.losses import ClippedPolicyLoss, value_loss
from lightrft_lightning.algorithms.module import RLModule
from lightrft_lightning.parallel.meta_init import PretrainedWeights, pretrained_weights, set_pretrained_weights
from lightrft_lightning.strategies.base import enable_gradient_checkpointing


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
        # the head in its parameters' dtype (an engine or FSDP2 may run them in bf16), the values in fp32
        return self.value_head(hidden.to(self.value_head.weight.dtype)).float().squeeze(-1)


class PPOLoss(ClippedPolicyLoss):
    """PPO's loss: the clipped policy term (the KL is in the per-token reward) and the clipped value
    loss, each aggregated by ``loss_agg``.

    Args:
        value_clip: values move at most this far from the rollout's values (None: no clipping).
        **kwargs: the arguments of :class:`~lightrft_lightning.algorithms.losses.ClippedPolicyLoss`.
    """

    def __init__(self, value_clip: Optional[float] = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.value_clip = value_clip

    def __call__(self, logp: Tensor, mb: Experience, mask: Tensor, **agg: Any) -> tuple[Tensor, dict[str, float]]:
        """The policy term of one micro-batch from the actor's ``logp`` on it, and its metrics."""
        return self.policy(logp, mb, mask, **agg)

    def value(self, values: Tensor, mb: Experience, **agg: Any) -> Tensor:
        """The value term of one micro-batch from the critic's ``values`` on it."""
        return value_loss(values, mb.values, mb.returns, mb.action_mask, self.value_clip, self.loss_agg, **agg)


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
        n_samples_per_prompt, kl_in_reward, advantage_estimator, advantages_norm: as in
            :func:`~lightrft_lightning.algorithms.flat.flat_parts`, with PPO's defaults (1 sample, KL in the
            per-token reward, "gae", the only estimator PPO takes, and whitened advantages).
        **kwargs: the other flat arguments of :func:`~lightrft_lightning.algorithms.flat.flat_parts`.
    """

    advantage_estimators = ("gae",)

    def __init__(self, critic_learning_rate: float = 9e-6, clip_low: float = 0.2, clip_high: float = 0.2,
                 value_clip: Optional[float] = 0.2, gamma: float = 1.0, lam: float = 0.95,
                 n_samples_per_prompt: int = 1, kl_in_reward: bool = True, advantage_estimator: str = "gae",
                 advantages_norm: bool = True, **kwargs: Any) -> None:
        parts = flat_parts(functools.partial(PPOLoss, clip_low=clip_low, clip_high=clip_high, value_clip=value_clip),
                           n_samples_per_prompt=n_samples_per_prompt, kl_in_reward=kl_in_reward,
                           advantage_estimator=advantage_estimator, advantages_norm=advantages_norm, **kwargs)
        parts["advantages"] = dataclasses.replace(parts["advantages"], gamma=gamma, lam=lam)
        super().__init__(**parts)
        self.critic_learning_rate = critic_learning_rate
        backbone = copy.deepcopy(self.actor.base_model)
        source = pretrained_weights(self.actor)
        if source is not None:  # a meta-device actor: the backbone's weights come from the same checkpoint
            set_pretrained_weights(backbone, PretrainedWeights(source.path, f"{self.actor.base_model_prefix}."))
        self.critic = CriticModel(backbone, self.actor.config.hidden_size)
        if self.policy.gradient_checkpointing:
            self.critic.gradient_checkpointing_enable()

    def _strategy_settings(self) -> dict[str, Any]:
        return {"critic_learning_rate": self.critic_learning_rate}

    def configure_optimizers(self) -> Any:
        """The actor's and the critic's AdamW, each with its learning-rate schedule."""
        actor = super().configure_optimizers()
        critic = self.trainer.strategy.create_optimizer(self.critic, lr=self.critic_learning_rate)
        return [actor["optimizer"], critic], [actor["lr_scheduler"], self.lr_scheduler_config(critic, "critic")]

    def _estimate_advantages(self, exp: Experience, rewards: Tensor) -> Optional[Tensor]:
        """GAE on the critic's values of the rollout; the KL is logged (and in the reward with
        ``kl_in_reward``)."""
        with torch.no_grad():
            self.critic.eval()
            exp.values = torch.cat([self.critic(mb.input_ids, mb.attention_mask)[:, :-1]
                                    for mb in exp.micro_batches(self.training_settings.scoring_batch_size)])
            self.critic.train()
        kl = self.loss.kl(exp.old_logp, exp.ref_logp)
        exp.advantages, exp.returns = self.advantages.estimate(
            rewards, exp.action_mask, self.rollout.n_samples_per_prompt, kl=kl,
            kl_coef=self.loss.kl_coef if self.loss.kl_in_reward else 0.0, values=exp.values)
        return kl

    def _train_micro_batch(self, mb: Experience, agg: dict[str, Any]) -> dict[str, float]:
        """The actor's step on the policy term, then the critic's on the value term."""
        actor_opt, critic_opt = self.optimizers()
        actor_sched, critic_sched = self.lr_schedulers()
        logp, mask, entropy = self._actor_forward(mb)
        loss, metrics = self.loss(logp, mb, mask, **agg)
        self._backward_and_step(loss, self.actor, actor_opt, actor_sched, "actor")
        v_loss = self.loss.value(self.critic(mb.input_ids, mb.attention_mask)[:, :-1], mb, **agg)
        self._backward_and_step(v_loss, self.critic, critic_opt, critic_sched, "critic")
        return {**metrics, "loss/value": v_loss.item(), "entropy": entropy}
