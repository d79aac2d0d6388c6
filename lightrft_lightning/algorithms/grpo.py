"""`GRPO`: group-relative policy optimization as a LightningModule (manual optimization)."""

from __future__ import annotations

import time
from typing import Any


from lightrft_lightning.algorithms.advantages import ESTIMATORS, compute_advantages
from lightrft_lightning.algorithms.base import Experience, RLModule
from lightrft_lightning.algorithms.losses import kl_loss


class GRPO(RLModule):
    """GRPO and its variants on a causal LM, with any LightRFT strategy.

    Per step: ``n_samples_per_prompt`` completions per prompt, advantages from ``advantage_estimator``
    ("group_norm" or LightRFT's "grpo": GRPO; "dr_grpo": no std normalization (use with
    ``loss_agg="constant"``); "rloo"; "reinforce++" and "reinforce++_baseline" (whitened returns);
    LightRFT's "reinforce" and "reinforce_baseline" (the same returns, not whitened: add
    ``advantages_norm=True`` for that); "cpgd" (group z-scores with the population std)), then ``epochs`` passes of the clipped policy loss with
    separate ``clip_low``/``clip_high`` (DAPO's clip-higher), plus ``kl_coef`` x KL to the frozen
    reference (in the loss, or in the reward with ``kl_in_reward``).

    Args:
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.
        **kwargs: the arguments of :class:`~lightrft_lightning.algorithms.base.RLModule`.
    """

    advantage_estimators = tuple(e for e in ESTIMATORS if e != "gae")

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if clip_low < 0 or clip_high < 0:
            raise ValueError(f"GRPO clip_low={clip_low!r}, clip_high={clip_high!r}; accepted: numbers >= 0")
        if self.hparams.advantage_estimator == "cpgd" and self.hparams.kl_in_reward and self.hparams.kl_coef > 0:
            raise ValueError("GRPO.advantage_estimator='cpgd' uses the reward before any KL penalty, and kl_in_reward=True; "
                             "accepted: kl_in_reward=False (KL in the loss), or another estimator")
        self.clip_low, self.clip_high = clip_low, clip_high

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        start = time.perf_counter()
        exp, rewards, metrics = self._rollout(batch)
        shaped = self._shape_rewards(rewards, exp, metrics)
        kl = self._kl(exp.old_logp, exp.ref_logp) if hp.kl_in_reward else None
        exp.advantages, exp.returns = compute_advantages(
            hp.advantage_estimator, shaped, exp.action_mask, hp.n_samples_per_prompt,
            kl=kl, kl_coef=hp.kl_coef, reduce=self._all_reduce_sum)
        self._shape_advantages(exp, rewards, metrics)
        self._train_and_log(exp, rewards, metrics, start)

    def _train(self, exp: Experience) -> dict[str, Any]:
        hp = self.hparams
        strategy = self.trainer.strategy
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        use_kl_loss = self.has_reference and not hp.kl_in_reward
        sums: dict[str, float] = {"loss/policy": 0.0, "clip_frac": 0.0, "entropy": 0.0}
        if self.has_reference:
            sums["kl"] = 0.0
        count = 0
        for t in self._policy_terms(exp):
            loss = t.loss
            sums["loss/policy"] += loss.item()
            if self.has_reference:
                kl_term = kl_loss(t.logp, t.mb.ref_logp, t.mb.action_mask, hp.kl_estimator, hp.loss_agg, **t.agg)
                sums["kl"] += kl_term.item()
                if use_kl_loss:
                    loss = loss + hp.kl_coef * kl_term
            strategy.backward(loss, self.actor, optimizer)
            strategy.optimizer_step(optimizer, self.actor, scheduler, name="actor")
            sums["clip_frac"] += t.clip_frac
            sums["entropy"] += t.entropy
            count += 1
        return {k: v / count for k, v in sums.items()}
