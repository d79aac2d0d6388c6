"""Policy, value and KL losses on ``[batch, time]`` token tensors with a response ``mask``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightrft_lightning.algorithms.advantages import KL_ESTIMATORS, kl_penalty

LOSS_AGGS = ("token", "sequence", "constant")


def aggregate(loss: Tensor, mask: Tensor, mode: str = "token", num_tokens: Optional[float] = None,
              max_len: Optional[int] = None) -> Tensor:
    """Reduce per-token ``loss`` to a scalar.

    - ``"token"``: sum over all response tokens / ``num_tokens`` (default: the tokens in ``mask``;
      pass the tokens per micro-batch of the whole optimizer step for DAPO's exact token mean);
    - ``"sequence"``: mean over sequences of each sequence's token mean (GRPO);
    - ``"constant"``: mean over sequences of token sums / ``max_len`` (Dr.GRPO; default: ``time``).
    """
    mask = mask.to(loss.dtype)
    if mode == "token":
        return (loss * mask).sum() / (num_tokens if num_tokens is not None else mask.sum().clamp(min=1))
    if mode == "sequence":
        return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if mode == "constant":
        return ((loss * mask).sum(1) / (max_len or mask.shape[1])).mean()
    raise ValueError(f"loss_agg={mode!r} is invalid; accepted: {', '.join(LOSS_AGGS)}")


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float = 0.2,
                clip_high: float = 0.2, agg: str = "token", **agg_kwargs) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate with separate lower and upper clip ranges (DAPO's clip-higher).

    Returns ``(loss, clip_fraction)``: the fraction of response tokens whose clipped term was chosen.
    Positions outside ``mask`` take no part, whatever their log-probs (the ratio there is 1).
    """
    m = mask.to(logp.dtype)
    ratio = torch.exp((logp - old_logp) * m)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clip_frac = ((clipped < unclipped).to(loss.dtype) * m).sum() / m.sum().clamp(min=1)
    return aggregate(loss, mask, agg, **agg_kwargs), clip_frac.detach()


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: Optional[float] = 0.2,
               agg: str = "token", **agg_kwargs) -> Tensor:
    """``0.5 * max((v - R)^2, (v_clipped - R)^2)`` with ``v_clipped`` within ``clip`` of the old value
    (plain squared error when ``clip`` is None)."""
    loss = (values - returns) ** 2
    if clip is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (v_clipped - returns) ** 2)
    return 0.5 * aggregate(loss, mask, agg, **agg_kwargs)


def kl_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: str = "k3", agg: str = "token",
            **agg_kwargs) -> Tensor:
    """KL(policy || reference) as a loss term (GRPO's "KL in the loss")."""
    return aggregate(kl_penalty(logp, ref_logp, estimator), mask, agg, **agg_kwargs)


class ClippedPolicyLoss:
    """The clipped policy term and the KL settings GRPO's and PPO's losses share.

    Args:
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]`` (DAPO's clip-higher).
        kl_coef: weight of KL(policy || reference); 0 builds no reference model.
        kl_estimator: "k1", "k2" or "k3".
        kl_in_reward: subtract the KL from the reward instead of adding it to the loss.
        loss_agg: "token" (DAPO: mean over all tokens of the optimizer step), "sequence" (mean of
            per-sequence means) or "constant" (Dr.GRPO: token sums / max_new_tokens).
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 kl_in_reward: bool = False, loss_agg: str = "token") -> None:
        self.clip_low, self.clip_high = clip_low, clip_high
        self.kl_coef, self.kl_estimator, self.kl_in_reward = kl_coef, kl_estimator, kl_in_reward
        self.loss_agg = loss_agg

    def check(self, owner: str) -> None:
        """Raise on a bad field, naming it as ``owner.field``."""
        for name, accepted in (("kl_estimator", KL_ESTIMATORS), ("loss_agg", LOSS_AGGS)):
            if getattr(self, name) not in accepted:
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r} is invalid; accepted: {', '.join(accepted)}")
        value = self.kl_coef
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"{owner}.kl_coef={value!r} is invalid; accepted: a number >= 0 (finite)")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"{owner} clip_low={self.clip_low!r}, clip_high={self.clip_high!r}; accepted: "
                             "numbers >= 0")

    @property
    def has_reference(self) -> bool:
        """Whether a KL reference is scored."""
        return self.kl_coef > 0

    def kl(self, logp: Tensor, ref_logp: Optional[Tensor]) -> Optional[Tensor]:
        """Per-token KL(policy || reference) (None without a reference)."""
        return None if ref_logp is None else kl_penalty(logp, ref_logp, self.kl_estimator)

    def policy(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
               **agg_kwargs) -> tuple[Tensor, Tensor]:
        """The clipped surrogate, aggregated by ``loss_agg``, and its clip fraction."""
        return policy_loss(logp, old_logp, advantages, mask, self.clip_low, self.clip_high, self.loss_agg,
                           **agg_kwargs)
