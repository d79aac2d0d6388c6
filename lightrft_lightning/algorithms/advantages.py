"""Advantage estimators and KL estimators shared by GRPO and PPO.

Token tensors are ``[batch, time]`` with a 0/1 ``mask`` marking response tokens; sequence tensors
are ``[batch]`` with the ``n`` samples of a prompt next to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from lightrft_lightning.algorithms.experience import Experience
from lightrft_lightning.config import RewardShaping

SumFn = Callable[[Tensor], Tensor]
KL_ESTIMATORS = ("k1", "k2", "k3")
ESTIMATORS = ("gae", "group_norm", "grpo", "dr_grpo", "rloo", "reinforce", "reinforce_baseline", "reinforce++",
              "reinforce++_baseline", "cpgd")
# estimators whose baseline is the prompt's group: a group of one sample gives every advantage 0
GROUP_ESTIMATORS = ("group_norm", "grpo", "dr_grpo", "rloo", "reinforce_baseline", "reinforce++_baseline", "cpgd")
# estimators whose advantages come from discounted per-token returns (``gamma``)
RETURN_ESTIMATORS = ("gae", "reinforce", "reinforce_baseline", "reinforce++", "reinforce++_baseline")
# LightRFT's names for the same estimator
ALIASES = {"grpo": "group_norm"}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's k1, k2, k3)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimator={estimator!r} is invalid; accepted: {', '.join(KL_ESTIMATORS)}")


def check_group_size(estimator: str, n: int, owner: str = "") -> None:
    """Raise unless ``n`` samples per prompt make groups the estimator can normalize (``n >= 2``);
    ``owner`` (e.g. ``"GRPO"``) prefixes the field names in the message."""
    if estimator in GROUP_ESTIMATORS and n < 2:
        prefix = f"{owner}." if owner else ""
        raise ValueError(f"{prefix}n_samples_per_prompt={n!r} is invalid for {prefix}advantage_estimator="
                         f"{estimator!r} (a group of one sample has advantage 0); accepted: n_samples_per_prompt "
                         ">= 2, or advantage_estimator='reinforce++' (no groups)")


def _groups(rewards: Tensor, n: int, estimator: str) -> Tensor:
    check_group_size(estimator, n)
    if rewards.numel() % n:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of n_samples_per_prompt={n}")
    return rewards.view(-1, n)


def group_norm(rewards: Tensor, n: int, std_normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO: ``(r - mean(group)) / (std(group) + eps)``; Dr.GRPO (``std_normalize=False``) drops the std."""
    g = _groups(rewards, n, "group_norm" if std_normalize else "dr_grpo")
    adv = g - g.mean(dim=1, keepdim=True)
    if std_normalize:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def cpgd(rewards: Tensor, n: int, eps: float = 1e-6) -> Tensor:
    """CPGD's advantage: each group's rewards standardized with the population std, ``(r - mean) / (std + eps)``."""
    g = _groups(rewards, n, "cpgd")
    return ((g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, unbiased=False, keepdim=True) + eps)).view(-1)


def rloo(rewards: Tensor, n: int) -> Tensor:
    """REINFORCE leave-one-out: ``r_i - mean(r_j, j != i)`` within each group."""
    g = _groups(rewards, n, "rloo")
    return (g - (g.sum(dim=1, keepdim=True) - g) / (n - 1)).view(-1)


def masked_sum(x: Tensor, mask: Tensor, reduce: Optional[SumFn] = None) -> Tensor:
    s = (x * mask).sum()
    return reduce(s) if reduce is not None else s


def whiten(x: Tensor, mask: Tensor, reduce: Optional[SumFn] = None, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / std`` over the masked entries (over all ranks when ``reduce`` sums across them)."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum().to(x.dtype)])
    if reduce is not None:
        stats = reduce(stats)
    total, sq, count = stats
    mean = total / count
    var = (sq / count - mean**2) * count / (count - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var.clamp(min=0) + eps) * mask


def token_rewards(rewards: Tensor, mask: Tensor, kl: Optional[Tensor] = None, kl_coef: float = 0.0) -> Tensor:
    """Put each sequence reward on its last response token; subtract ``kl_coef * kl`` on every token."""
    out = torch.zeros_like(mask, dtype=rewards.dtype)
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
    out[torch.arange(len(rewards)), last] = rewards
    if kl is not None and kl_coef:
        out = out - kl_coef * kl
    return out * mask


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` over response tokens; ``t + 1`` is the next token of the mask,
    so a multi-turn episode's earlier turns get the later rewards across the environment's tokens."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        out[:, t] = running
    return out * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation; returns ``(advantages, returns)`` with returns = adv + values."""
    values, rewards = values * mask, rewards * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):  # the steps are the mask's tokens (a multi-turn gap is skipped)
        on = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(on, delta + gamma * lam * running, running)
        next_value = torch.where(on, values[:, t], next_value)
        adv[:, t] = running
    return adv * mask, (adv + values) * mask


def compute_advantages(
    estimator: str,
    rewards: Tensor,
    mask: Tensor,
    n: int,
    kl: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    values: Optional[Tensor] = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    reduce: Optional[SumFn] = None,
) -> tuple[Tensor, Tensor]:
    """Token-level ``(advantages, returns)`` for ``estimator`` from sequence ``rewards``.

    ``kl`` with ``kl_coef`` (KL in the reward) is subtracted per token for gae and reinforce++, and as
    a per-sequence sum for the group estimators. ``reduce`` sums a tensor over ranks (whitening).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage_estimator={estimator!r} is invalid; accepted: {', '.join(ESTIMATORS)}")
    check_group_size(estimator, n)
    estimator = ALIASES.get(estimator, estimator)
    mask = mask.to(rewards.dtype)
    if estimator == "cpgd":
        if kl is not None and kl_coef:
            raise ValueError("advantage_estimator='cpgd' uses the reward before any KL penalty; accepted: KL in the "
                             "loss (kl_in_reward=False), or another estimator")
        adv = cpgd(rewards, n)[:, None] * mask
        return adv, adv
    if estimator in RETURN_ESTIMATORS:
        if estimator in ("reinforce_baseline", "reinforce++_baseline"):
            rewards = group_norm(rewards, n, std_normalize=False)
        per_token = token_rewards(rewards, mask, kl, kl_coef)
        if estimator == "gae":
            if values is None:
                raise ValueError("advantage_estimator='gae' needs values from a critic (use PPO)")
            return gae(per_token, values, mask, gamma, lam)
        returns = returns_to_go(per_token, mask, gamma)
        if estimator in ("reinforce", "reinforce_baseline"):  # LightRFT's: the returns themselves
            return returns, returns
        return whiten(returns, mask, reduce), returns
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * (kl * mask).sum(dim=1)
    if estimator == "rloo":
        seq = rloo(rewards, n)
    else:
        seq = group_norm(rewards, n, std_normalize=estimator == "group_norm")
    adv = seq[:, None] * mask
    return adv, adv


# ---------------------------------------------------------------------------- reward and advantage shaping
def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer_len: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (LightRFT's ``overlong_buffer``): 0 up to ``max_new_tokens -
    buffer_len`` tokens, then falling linearly to ``-factor`` at ``max_new_tokens``."""
    expected = max_new_tokens - buffer_len
    return torch.clamp(-(lengths.to(torch.float32) - expected) / buffer_len * factor, max=0.0)


class RunningMoments:
    """Mean and variance of every value seen so far (over all ranks when ``update`` gets ``reduce``),
    merged batch by batch (Chan et al.); a checkpoint keeps :meth:`state_dict`."""

    def __init__(self) -> None:
        self.count, self.mean, self.var = 0.0, 0.0, 1.0

    def update(self, x: Tensor, reduce: Optional[SumFn] = None) -> None:
        stats = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
                             x.double().sum(), (x.double() ** 2).sum()])
        if reduce is not None:
            stats = reduce(stats)
        n, total, sq = (float(v) for v in stats)
        if n == 0:
            return
        batch_mean = total / n
        batch_var = max(sq / n - batch_mean ** 2, 0.0)
        new_count = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / new_count
        self.mean += delta * n / new_count
        self.var = m2 / new_count
        self.count = new_count

    @property
    def std(self) -> float:
        return self.var ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]


def tied_groups(rewards: Tensor, n: int) -> Tensor:
    """Per sample: whether every sample of its prompt group got the same reward (no signal for a
    group baseline; DAPO's dynamic sampling leaves them out)."""
    g = rewards.view(-1, n)
    return (g == g[:, :1]).all(dim=1).repeat_interleave(n)


def normalize_and_clip(advantages: Tensor, mask: Tensor, norm: bool, clip: float,
                       reduce: Optional[SumFn] = None) -> tuple[Tensor, Tensor]:
    """LightRFT's ``advantages_norm`` (whiten over the response tokens of all ranks) and
    ``advantage_clip`` (clamp to ``[-clip, clip]``, 0: off). Returns the advantages and the fraction of
    response tokens the clip changed."""
    mask = mask.to(advantages.dtype)
    if norm:
        advantages = whiten(advantages, mask, reduce)
    frac = torch.zeros((), dtype=advantages.dtype, device=advantages.device)
    if clip > 0:
        clipped = (advantages.abs() > clip).to(advantages.dtype) * mask
        counts = torch.stack([clipped.sum(), mask.sum()])
        if reduce is not None:
            counts = reduce(counts)
        frac = counts[0] / counts[1].clamp(min=1)
        advantages = advantages.clamp(-clip, clip) * mask
    return advantages, frac


SHAPING_FLAGS = ("reward_running_norm", "reward_running_norm_minus_mean", "advantages_norm", "overlong_buffer",
                 "dynamic_sampling")
SHAPING_NUMBERS = ("reward_clip", "advantage_clip", "overlong_buffer_penalty_factor")


@dataclass
class Advantages(RewardShaping):
    """How sequence rewards become token advantages: the ``estimator`` and LightRFT's shaping around it.

    Shaping runs in this order: overlong penalty, running normalization, clip (on the rewards); then
    the estimator, dynamic sampling, advantage normalization and clip.

    Args:
        estimator: see :data:`ESTIMATORS` (``"gae"`` needs a critic: PPO).
        The shaping fields (``reward_clip`` ... ``dynamic_sampling``): see
            :class:`~lightrft_lightning.config.RewardShaping`.
        gamma, lam: the discount (GAE, returns) and GAE's lambda.
    """

    estimator: str = "group_norm"
    gamma: float = 1.0
    lam: float = 0.95

    def __post_init__(self) -> None:
        self.moments = RunningMoments()

    def check(self, owner: str, accepted: tuple[str, ...], n_samples_per_prompt: int, max_new_tokens: int) -> None:
        """Raise on a bad field (named ``owner.field``); ``accepted``: the estimators ``owner`` takes."""
        if self.estimator not in accepted:
            raise ValueError(f"{owner}.advantage_estimator={self.estimator!r} is invalid; accepted: "
                             f"{', '.join(accepted)}")
        check_group_size(self.estimator, n_samples_per_prompt, owner)
        for name in SHAPING_FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r} is invalid; accepted: True or False")
        for name in SHAPING_NUMBERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{owner}.{name}={value!r} is invalid; accepted: a number >= 0 (finite)")
        if self.reward_running_norm_minus_mean and not self.reward_running_norm:
            raise ValueError(f"{owner}.reward_running_norm_minus_mean=True needs reward_running_norm=True; accepted: "
                             "reward_running_norm=True, or reward_running_norm_minus_mean=False")
        length = self.overlong_buffer_len
        if self.overlong_buffer:
            if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= max_new_tokens:
                raise ValueError(f"{owner}.overlong_buffer_len={length!r} is invalid with max_new_tokens="
                                 f"{max_new_tokens}; accepted: an integer in [1, max_new_tokens]")
        elif length != 1024 or self.overlong_buffer_penalty_factor != 1.0:
            raise ValueError(f"{owner}.overlong_buffer_len={length!r} / overlong_buffer_penalty_factor="
                             f"{self.overlong_buffer_penalty_factor!r} are only used with overlong_buffer=True; "
                             "accepted: overlong_buffer=True, or both left at their defaults (1024, 1.0)")
        if self.lam != 0.95 and self.estimator != "gae":
            raise ValueError(f"{owner}.lam={self.lam!r} is only used by advantage_estimator='gae'; accepted: the "
                             "default 0.95 with another estimator")
        if self.gamma != 1.0 and self.estimator not in RETURN_ESTIMATORS:
            raise ValueError(f"{owner}.gamma={self.gamma!r} is only used by advantage_estimator in "
                             f"{', '.join(RETURN_ESTIMATORS)}; accepted: the default 1.0 with another estimator")
        if self.dynamic_sampling and n_samples_per_prompt < 2:
            raise ValueError(f"{owner}.dynamic_sampling=True needs prompt groups: n_samples_per_prompt="
                             f"{n_samples_per_prompt!r}; accepted: n_samples_per_prompt >= 2, or "
                             "dynamic_sampling=False")

    def shape_rewards(self, rewards: Tensor, lengths: Tensor, max_new_tokens: int, metrics: dict,
                      reduce: Optional[SumFn] = None) -> Tensor:
        """Overlong penalty on the response ``lengths``, running normalization, clip (each when enabled)."""
        if self.overlong_buffer:
            penalty = overlong_penalty(lengths, max_new_tokens, self.overlong_buffer_len,
                                       self.overlong_buffer_penalty_factor).to(rewards.dtype)
            rewards = rewards + penalty
            metrics["overlong/penalty"] = float(penalty.mean())
        if self.reward_running_norm:
            self.moments.update(rewards, reduce)
            std = max(self.moments.std, 1e-8)
            rewards = (rewards - self.moments.mean) / std if self.reward_running_norm_minus_mean else rewards / std
        if self.reward_clip > 0:
            rewards = rewards.clamp(-self.reward_clip, self.reward_clip)
        if self.overlong_buffer or self.reward_running_norm or self.reward_clip > 0:
            metrics["reward_shaped"] = float(rewards.mean())
        return rewards

    def estimate(self, rewards: Tensor, mask: Tensor, n: int, kl: Optional[Tensor] = None, kl_coef: float = 0.0,
                 values: Optional[Tensor] = None, reduce: Optional[SumFn] = None) -> tuple[Tensor, Tensor]:
        """Token ``(advantages, returns)`` of the shaped ``rewards`` (see :func:`compute_advantages`)."""
        return compute_advantages(self.estimator, rewards, mask, n, kl=kl, kl_coef=kl_coef, values=values,
                                  gamma=self.gamma, lam=self.lam, reduce=reduce)

    def shape_advantages(self, exp: Experience, raw_rewards: Tensor, n: int, metrics: dict,
                         reduce: Optional[SumFn] = None) -> None:
        """Dynamic sampling (mask the groups whose raw rewards all tie), then advantage normalization
        and clip, on ``exp.advantages`` (and ``exp.action_mask``) in place."""
        if self.dynamic_sampling:
            keep = ~tied_groups(raw_rewards, n)
            exp.action_mask = exp.action_mask * keep[:, None].to(exp.action_mask.dtype)
            exp.advantages = exp.advantages * exp.action_mask
            metrics["dynamic_sampling/kept"] = float(keep.float().mean())
        exp.advantages, frac = normalize_and_clip(exp.advantages, exp.action_mask, self.advantages_norm,
                                                  self.advantage_clip, reduce)
        if self.advantage_clip > 0:
            metrics["advantage_clip_frac"] = float(frac)
