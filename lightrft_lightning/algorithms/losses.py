"""Policy, value and KL losses on ``[batch, time]`` token tensors with a response ``mask``."""

from __future__ import annotations

import math
from typing import Any, Optional

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


POLICY_LOSS_TYPES = ("ppo", "gspo")
CORRECTION_LEVELS = ("token", "sequence", "geometric")
MAX_LOG_RATIO = 20.0  # |log pi_old/mu| beyond this is clamped (exp(20) ~ 5e8): no inf * 0 in the weights


def level_log_ratio(log_ratio: Tensor, mask: Tensor, level: str) -> Tensor:
    """Per-token log-ratios (0 outside ``mask``) at ``level``: "token" ``[B, T]`` as they are;
    "sequence" ``[B, 1]``, their sum (the log of the product of the token ratios); "geometric"
    ``[B, 1]``, their mean over the sequence's tokens (the log of the geometric mean; an empty
    sequence gets 0, ratio 1)."""
    m = mask.to(log_ratio.dtype)
    if level == "token":
        return log_ratio * m
    total = (log_ratio * m).sum(1, keepdim=True)
    if level == "sequence":
        return total
    if level == "geometric":
        return total / m.sum(1, keepdim=True).clamp(min=1)
    raise ValueError(f"level={level!r} is invalid; accepted: {', '.join(CORRECTION_LEVELS)}")


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float = 0.2,
                clip_high: float = 0.2, agg: str = "token", policy_loss_type: str = "ppo",
                weights: Optional[Tensor] = None, **agg_kwargs) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate with separate lower and upper clip ranges (DAPO's clip-higher).

    ``policy_loss_type="gspo"`` (GSPO, Zheng et al. 2025): the ratio is the sequence's, length-normalized,
    ``exp(mean over its tokens of (logp - old_logp))``, and it is clipped per sequence; each token of
    the sequence carries that one ratio. ``weights`` (detached, ``[B, T]``): per-token factors of the
    loss, e.g. the importance weights of :func:`rollout_correction`.

    Returns ``(loss, clip_fraction)``: the fraction of response tokens whose clipped term was chosen.
    Positions outside ``mask`` take no part, whatever their log-probs (the ratio there is 1).
    """
    m = mask.to(logp.dtype)
    if policy_loss_type == "ppo":
        log_ratio = (logp - old_logp) * m
    elif policy_loss_type == "gspo":
        log_ratio = level_log_ratio(logp - old_logp, m, "geometric")
    else:
        raise ValueError(f"policy_loss_type={policy_loss_type!r} is invalid; accepted: {', '.join(POLICY_LOSS_TYPES)}")
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clip_frac = ((clipped < unclipped).to(loss.dtype) * m).sum() / m.sum().clamp(min=1)
    if weights is not None:
        loss = loss * weights
    return aggregate(loss, mask, agg, **agg_kwargs), clip_frac.detach()


def rollout_correction(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, is_level: Optional[str] = None,
                       is_threshold: float = 2.0, rs_level: Optional[str] = None, rs_threshold: float = 2.0,
                       rs_threshold_lower: Optional[float] = None) -> tuple[Optional[Tensor], dict[str, Tensor]]:
    """Importance weights correcting for the engine that sampled (``rollout_logp``, mu) not being the
    policy the loss takes as old (``old_logp``, pi_old), and the mismatch metrics.

    - ``is_level`` (truncated importance sampling, TIS: Yao et al. 2025, "Your efficient RL framework
      secretly brings you off-policy RL training"): weight ``min(pi_old / mu, is_threshold)`` per token,
      or per sequence (product, or geometric mean, of the token ratios);
    - ``rs_level`` (masked importance sampling / rejection, MIS: Liu et al. 2025, "When speed kills
      stability"; IcePop for tokens, Ling team 2025): weight 0 for the tokens, or the whole
      sequences, whose ratio leaves ``[rs_threshold_lower, rs_threshold]`` (lower default:
      ``1 / rs_threshold``). A masked token keeps its place in the token count (as TRL and OpenRLHF do).

    Both may be on (the weights multiply). Returns ``(weights or None when both are off, metrics)``;
    the metrics (over the tokens of ``mask``): ``logp_abs_diff`` (mean ``|pi_old - mu|``), ``kl`` (k3
    estimate of KL(mu || pi_old), unbiased on mu's samples), ``ratio_max`` (the largest token ratio),
    and with a correction on, the fractions of tokens and of sequences (those with any such token)
    ``truncated`` and ``masked``.
    """
    m = mask.bool()
    tokens = m.sum().clamp(min=1)
    seqs = m.any(1)
    n_seqs = seqs.sum().clamp(min=1)
    log_ratio = ((old_logp - rollout_logp) * m).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    metrics = {
        "logp_abs_diff": log_ratio.abs().sum() / tokens,
        "kl": (kl_penalty(rollout_logp, old_logp, "k3") * m).sum() / tokens,
        "ratio_max": log_ratio.masked_fill(~m, float("-inf")).max().exp() if m.any() else log_ratio.new_zeros(()),
    }

    def fractions(name: str, hit: Tensor) -> None:
        hit = hit.expand_as(m) & m
        metrics[f"tokens_{name}"] = hit.sum() / tokens
        metrics[f"seqs_{name}"] = hit.any(1).sum() / n_seqs

    weights = None
    if is_level is not None:
        level = level_log_ratio(log_ratio, m, is_level)
        cap = math.log(is_threshold)
        weights = level.clamp(max=cap).exp().expand_as(log_ratio)
        fractions("truncated", level > cap)
    if rs_level is not None:
        level = level_log_ratio(log_ratio, m, rs_level)
        low = 1.0 / rs_threshold if rs_threshold_lower is None else rs_threshold_lower
        keep = (level <= math.log(rs_threshold)) & (level >= (math.log(low) if low > 0 else float("-inf")))
        weights = (keep.to(log_ratio.dtype) if weights is None else weights * keep).expand_as(log_ratio)
        fractions("masked", ~keep)
    return (None if weights is None else (weights * m).detach()), {k: v.detach() for k, v in metrics.items()}


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
    """The clipped policy term, its off-policy correction and the KL settings GRPO's and PPO's losses share.

    Args:
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]`` (DAPO's clip-higher).
        kl_coef: weight of KL(policy || reference); 0 builds no reference model.
        kl_estimator: "k1", "k2" or "k3".
        kl_in_reward: subtract the KL from the reward instead of adding it to the loss.
        loss_agg: "token" (DAPO: mean over all tokens of the optimizer step), "sequence" (mean of
            per-sequence means) or "constant" (Dr.GRPO: token sums / max_new_tokens).
        policy_loss_type: "ppo" (token ratios) or "gspo" (GSPO: one length-normalized ratio per
            sequence, clipped per sequence; GSPO's paper clips at 3e-4 / 4e-4).
        rollout_is: truncated importance sampling (TIS) of the engine's samples: None (off), "token",
            "sequence" or "geometric" (the ratio pi_old / mu per token, per sequence, or the
            sequence's geometric mean); the weight is ``min(ratio, rollout_is_threshold)``.
        rollout_is_threshold: TIS's cap C.
        rollout_rs: masked importance sampling (MIS / IcePop): None (off), "token", "sequence" or
            "geometric": drop what has a ratio outside ``[rollout_rs_threshold_lower, rollout_rs_threshold]``.
        rollout_rs_threshold, rollout_rs_threshold_lower: that range (lower default: 1 / upper).

    The settings are verl's ``rollout_correction`` names; :func:`rollout_correction` defines them.
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 kl_in_reward: bool = False, loss_agg: str = "token", policy_loss_type: str = "ppo",
                 rollout_is: Optional[str] = None, rollout_is_threshold: float = 2.0, rollout_rs: Optional[str] = None,
                 rollout_rs_threshold: float = 2.0, rollout_rs_threshold_lower: Optional[float] = None) -> None:
        self.clip_low, self.clip_high = clip_low, clip_high
        self.kl_coef, self.kl_estimator, self.kl_in_reward = kl_coef, kl_estimator, kl_in_reward
        self.loss_agg, self.policy_loss_type = loss_agg, policy_loss_type
        self.rollout_is, self.rollout_is_threshold = rollout_is, rollout_is_threshold
        self.rollout_rs, self.rollout_rs_threshold = rollout_rs, rollout_rs_threshold
        self.rollout_rs_threshold_lower = rollout_rs_threshold_lower

    def check(self, owner: str) -> None:
        """Raise on a bad field, naming it as ``owner.field``."""
        for name, accepted in (("kl_estimator", KL_ESTIMATORS), ("loss_agg", LOSS_AGGS),
                               ("policy_loss_type", POLICY_LOSS_TYPES), ("rollout_is", (None, *CORRECTION_LEVELS)),
                               ("rollout_rs", (None, *CORRECTION_LEVELS))):
            if getattr(self, name) not in accepted:
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r} is invalid; accepted: "
                                 f"{', '.join(map(str, accepted))}")
        value = self.kl_coef
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"{owner}.kl_coef={value!r} is invalid; accepted: a number >= 0 (finite)")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"{owner} clip_low={self.clip_low!r}, clip_high={self.clip_high!r}; accepted: "
                             "numbers >= 0")
        for name, switch, default in (("rollout_is_threshold", "rollout_is", 2.0),
                                      ("rollout_rs_threshold", "rollout_rs", 2.0),
                                      ("rollout_rs_threshold_lower", "rollout_rs", None)):
            value = getattr(self, name)
            if getattr(self, switch) is None and value != default:
                raise ValueError(f"{owner}.{name}={value!r} is only used with {switch} set, and {switch}=None; "
                                 f"accepted: {switch}='token', 'sequence' or 'geometric', or {name}={default!r}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < float("inf")):
                raise ValueError(f"{owner}.{name}={value!r} is invalid; accepted: a number > 0 (finite)")
        lower = self.rollout_rs_threshold_lower
        if lower is not None and lower > self.rollout_rs_threshold:
            raise ValueError(f"{owner}.rollout_rs_threshold_lower={lower!r} is above rollout_rs_threshold="
                             f"{self.rollout_rs_threshold!r}; accepted: a lower bound <= the upper one")

    @property
    def has_reference(self) -> bool:
        """Whether a KL reference is scored."""
        return self.kl_coef > 0

    @property
    def corrects_rollout(self) -> bool:
        """Whether the policy term weights the engine's samples (TIS and/or MIS)."""
        return self.rollout_is is not None or self.rollout_rs is not None

    def kl(self, logp: Tensor, ref_logp: Optional[Tensor]) -> Optional[Tensor]:
        """Per-token KL(policy || reference) (None without a reference)."""
        return None if ref_logp is None else kl_penalty(logp, ref_logp, self.kl_estimator)

    def policy(self, logp: Tensor, mb: Any, mask: Tensor, **agg_kwargs) -> tuple[Tensor, dict[str, float]]:
        """The clipped surrogate of one micro-batch (an :class:`~lightrft_lightning.algorithms.experience.Experience`),
        aggregated by ``loss_agg``, and its metrics: ``loss/policy``, ``clip_frac``, and when the
        engine returned log-probs (``mb.rollout_logp``) the ``mismatch/*`` metrics of
        :func:`rollout_correction` between them and ``old_logp``.

        ``old_logp`` is ``mb.old_logp`` or, where the module left it unscored (one pass, one optimizer
        step: the weights being trained are the rollout's), ``logp`` detached: pi_old either way."""
        old_logp = logp.detach() if mb.old_logp is None else mb.old_logp
        weights, mismatch = None, {}
        if mb.rollout_logp is not None:
            weights, mismatch = rollout_correction(
                old_logp, mb.rollout_logp, mask, self.rollout_is, self.rollout_is_threshold, self.rollout_rs,
                self.rollout_rs_threshold, self.rollout_rs_threshold_lower)
        elif self.corrects_rollout:
            raise ValueError(f"rollout_is={self.rollout_is!r}, rollout_rs={self.rollout_rs!r} need the rollout engine's "
                             "log-probs (Experience.rollout_logp), and this rollout has none; accepted: an engine that "
                             "returns Completion.logprobs, or rollout_is=None and rollout_rs=None")
        loss, clip_frac = policy_loss(logp, old_logp, mb.advantages, mask, self.clip_low, self.clip_high, self.loss_agg,
                                      self.policy_loss_type, weights, **agg_kwargs)
        metrics = {"loss/policy": loss.item(), "clip_frac": clip_frac.item()}
        metrics.update({f"mismatch/{k}": v.item() for k, v in mismatch.items()})
        return loss, metrics
