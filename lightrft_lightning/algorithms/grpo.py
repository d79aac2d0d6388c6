"""`GRPO`: group-relative policy optimization: its loss, and the module built from flat arguments."""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor

from lightrft_lightning.algorithms.experience import Experience
from lightrft_lightning.algorithms.flat import flat_parts
from lightrft_lightning.algorithms.losses import ClippedPolicyLoss, kl_loss
from lightrft_lightning.algorithms.module import RLModule


class GRPOLoss(ClippedPolicyLoss):
    """GRPO's whole loss: the clipped policy term plus ``kl_coef`` x KL to the reference (unless the KL
    goes into the reward, ``kl_in_reward``), both aggregated by ``loss_agg``."""

    def __call__(self, logp: Tensor, mb: Experience, mask: Tensor, **agg: Any) -> tuple[Tensor, dict[str, float]]:
        """The loss of one micro-batch from the actor's ``logp`` on it (``mask``: the response tokens the
        policy term takes; the KL term takes all of ``mb.action_mask``), and its metrics."""
        loss, metrics = self.policy(logp, mb, mask, **agg)
        if self.has_reference:
            kl_term = kl_loss(logp, mb.ref_logp, mb.action_mask, self.kl_estimator, self.loss_agg, **agg)
            metrics["kl"] = kl_term.item()
            if not self.kl_in_reward:
                loss = loss + self.kl_coef * kl_term
        return loss, metrics


class GRPO(RLModule):
    """GRPO and its variants on a causal LM, with any LightRFT strategy: an :class:`RLModule` with a
    :class:`GRPOLoss`, built from flat arguments.

    Per step: ``n_samples_per_prompt`` completions per prompt, advantages from ``advantage_estimator``
    ("group_norm" or LightRFT's "grpo": GRPO; "dr_grpo": no std normalization (use with
    ``loss_agg="constant"``); "rloo"; "reinforce++" and "reinforce++_baseline" (whitened returns);
    LightRFT's "reinforce" and "reinforce_baseline" (the same returns, not whitened: add
    ``advantages_norm=True`` for that); "cpgd" (group z-scores with the population std)), then ``epochs``
    passes of the clipped policy loss with separate ``clip_low``/``clip_high`` (DAPO's clip-higher), plus
    ``kl_coef`` x KL to the frozen reference (in the loss, or in the reward with ``kl_in_reward``).

    Args:
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.
        **kwargs: the flat arguments of :func:`~lightrft_lightning.algorithms.flat.flat_parts`.
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**flat_parts(functools.partial(GRPOLoss, clip_low=clip_low, clip_high=clip_high), **kwargs))
