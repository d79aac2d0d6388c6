"""`RLModule`: what GRPO and PPO share: models, rollouts through the rollout-engine callback,
rewards, micro-batching through the strategy, and metrics."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightrft_lightning.algorithms.advantages import (KL_ESTIMATORS, RunningMoments,
                                                     check_group_size, kl_penalty, normalize_and_clip,
                                                     overlong_penalty, tied_groups)
from lightrft_lightning.algorithms.losses import LOSS_AGGS, policy_loss
from lightrft_lightning.algorithms.packing import SharedPromptBatch, pack_shared_prompts
from lightrft_lightning.algorithms.rewards import CombinedReward
from lightrft_lightning.callbacks.rollout_engine import hf_model
from lightrft_lightning.config import StrategyConfig
from lightrft_lightning.data import render_prompts
from lightrft_lightning.engines.base import Completion, SamplingParams
from lightrft_lightning.lora import LoRASettings, adapters_disabled, apply_lora, frozen_base_keys
from lightrft_lightning.strategies.base import StrategyBase, enable_gradient_checkpointing
from lightrft_lightning.tokenizer import load_tokenizer

_GLOBAL_METRICS = ("reward", "reward_std", "adv", "adv_std")
DEFAULT_REWARDS = {"lightrft_lightning.tasks:counting_reward": 1.0}
LR_SCHEDULERS = ("constant", "cosine")
DEFAULT_MIN_LR_RATIO = 0.1


@dataclass
class Experience:
    """One rollout: ``[N, L]`` sequences (prompt + response, right-padded) and ``[N, L-1]`` per-token
    tensors aligned with the tokens they predict (``action_mask`` marks response tokens)."""

    input_ids: Tensor
    attention_mask: Tensor
    action_mask: Tensor
    old_logp: Optional[Tensor] = None
    ref_logp: Optional[Tensor] = None
    values: Optional[Tensor] = None
    advantages: Optional[Tensor] = None
    returns: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, stop: int) -> "Experience":
        return Experience(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[start:stop])
                             for f in dataclasses.fields(self)})


def load_causal_lm(model: str, vocab_size: int, model_config: Optional[dict] = None) -> nn.Module:
    """``"tiny"``: a random-init tiny Qwen2 (``model_config`` overrides its size); else the local HF
    directory :func:`model_dir` gives, in fp32."""
    if model == "tiny":
        from lightrft_lightning.tiny_models import tiny_causal_lm

        return tiny_causal_lm(**{"vocab_size": vocab_size, **(model_config or {})})
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)


def model_dir(model: str) -> str:
    """The local directory of ``model`` (a built-in name is fetched and converted on first use)."""
    from lightrft_lightning import pretrained

    try:
        return pretrained.resolve(model)
    except ValueError as err:
        raise ValueError(f"{err}; or 'tiny'") from None


@dataclass
class PolicyTerms:
    """One micro-batch's policy-loss terms (see ``RLModule._policy_terms``)."""

    mb: Experience
    agg: dict[str, Any]
    logp: Tensor
    loss: Tensor
    clip_frac: float
    entropy: float


class RLModule(pl.LightningModule):
    """Base of the RLHF modules (manual optimization through the LightRFT strategy API).

    Each ``training_step`` takes a batch of prompt rows, samples ``n_samples_per_prompt`` completions per
    prompt with the rollout engine, scores them, and runs ``epochs`` passes of micro-batches of
    ``micro_train_batch_size`` samples; the strategy accumulates gradients and steps the optimizer every
    ``train_batch_size`` samples (over all ranks; default: once per pass). The module writes these
    sizes, ``rollout_batch_size`` (prompts per step x ranks, from the datamodule's ``batch_size``),
    ``micro_rollout_batch_size``, ``lr_warmup_ratio`` and ``gradient_checkpointing`` into
    ``trainer.strategy.config`` at setup, so the strategy and the module always agree; a strategy config
    that sets one of the latter four to another non-default value is refused rather than overwritten.

    Each optimizer (the actor's; PPO's critic's too) gets a learning-rate schedule over the
    :meth:`num_optimizer_steps` of the fit: a linear warmup from 0 over ``lr_warmup_ratio`` of them, then
    a constant rate or a cosine decay to ``min_lr_ratio`` x the rate. The strategy steps it with each
    real optimizer step (not on accumulation micro-steps, nor on steps skipped for a non-finite
    gradient norm); Lightning saves and restores it with the checkpoint.

    Args:
        model: ``"tiny"`` (random-init tiny Qwen2), a built-in name (``"smollm2-135m-instruct"``, fetched
            and converted on first use) or a local Hugging Face directory.
        tokenizer: ``"char"`` (built-in character tokenizer), a built-in model name or a local Hugging Face
            directory; None: ``"char"`` with ``model="tiny"``, else the model's own.
        tokenizer_chars: the characters of the ``"char"`` tokenizer.
        model_config: overrides of the tiny model's config (``hidden_size``, ``num_hidden_layers``...).
        rewards: ``{"package.module:function" or reward-model directory: weight}``.
        n_samples_per_prompt: completions sampled per prompt.
        max_new_tokens, temperature, top_p: sampling.
        micro_train_batch_size: samples per forward/backward.
        train_batch_size: samples per optimizer step over all ranks (None: a whole rollout).
        epochs: optimization passes over each rollout.
        actor_learning_rate: AdamW learning rate of the policy.
        kl_coef: weight of KL(policy || reference); 0 builds no reference model.
        kl_estimator: "k1", "k2" or "k3".
        kl_in_reward: subtract the KL from the reward instead of adding it to the loss.
        loss_agg: "token" (DAPO: mean over all tokens of the optimizer step), "sequence" (mean of
            per-sequence means) or "constant" (Dr.GRPO: token sums / max_new_tokens).
        micro_rollout_batch_size: samples per no-grad forward when scoring a rollout (the actor's and
            reference's log-probs, PPO's values); None: ``micro_train_batch_size``. The engine gets
            the whole rollout in one call.
        lr_scheduler: "constant" or "cosine" (decay to ``min_lr_ratio`` x the learning rate), after warmup.
        lr_warmup_ratio: the fraction of the optimizer steps with a linear warmup from 0 (rounded up).
        min_lr_ratio: where the cosine ends, as a fraction of the learning rate ("cosine" only).
        gradient_checkpointing: recompute the actor's (and PPO's critic's) layer activations in the
            backward pass: less activation memory for a second forward of each layer.
        apply_chat_template: render ``prompt`` rows as a user message with the tokenizer's chat template
            (``messages`` rows always are; see :func:`~lightrft_lightning.data.render_prompts`).
        val_samples: besides the greedy completion (``val/accuracy``), sample this many completions per
            validation prompt at ``val_temperature`` (``val/mean@n``); 0: greedy only.
        sample_every_n_steps: every this many steps write a few prompts and completions to
            ``<log_dir>/samples.jsonl`` and to loggers that take text; 0: never.
        reward_clip: clip each sequence reward to ``[-reward_clip, reward_clip]`` (0: off; LightRFT's).
        reward_running_norm: divide rewards by the std of all rewards seen so far (all ranks, kept in
            checkpoints); with ``reward_running_norm_minus_mean`` also subtract their mean (LightRFT's).
        advantages_norm: whiten the advantages over the response tokens of the rollout (all ranks).
        advantage_clip: clip advantages to ``[-advantage_clip, advantage_clip]`` after that (0: off).
        overlong_buffer: DAPO's soft overlong punishment: a response longer than ``max_new_tokens -
            overlong_buffer_len`` tokens loses ``(length - that) / overlong_buffer_len x
            overlong_buffer_penalty_factor`` reward.
        dynamic_sampling: DAPO's dynamic sampling, with fixed batch shapes: prompt groups whose samples
            all got the same reward are left out of the loss (their response tokens are masked, so they
            count neither in the loss nor in its token normalizer); needs ``n_samples_per_prompt >= 2``.
        lora: ``{r, alpha, dropout, target_modules}`` (``alpha`` defaults to ``r``, ``target_modules`` to
            the attention and MLP projections): train LoRA adapters of the actor (``peft``, the ``lora``
            extra) instead of all its weights. Only the adapters are trainable and in the optimizer; the
            KL reference is the same base with the adapters off (no second copy of the weights); the
            rollout engine gets the merged weights (base + ``alpha / r`` x the adapter product);
            checkpoints hold the adapters and their optimizer state, not the frozen base (rebuilt from
            ``model``); PPO's critic trains adapters of its own copy of the backbone, and its value head.

    Reward shaping runs in this order: overlong penalty, running normalization, clip; then the
    advantage estimator, dynamic sampling, advantage normalization and clip. Each setting is also a
    ``StrategyConfig`` field of the same name (what LightRFT's trainers read): under a Trainer the
    module writes its values there, and a config that sets another non-default value is refused.

    ``val/accuracy`` and ``val/mean@n`` are the mean score of the first reward in ``rewards`` (a 0/1
    correctness reward makes them accuracies); ``val/reward`` is the greedy weighted total.
    """

    advantage_estimators: tuple[str, ...] = ()

    def __init__(
        self,
        model: str = "tiny",
        tokenizer: Optional[str] = None,
        tokenizer_chars: Optional[str] = None,
        model_config: Optional[dict[str, Any]] = None,
        rewards: Optional[dict[str, float]] = None,
        n_samples_per_prompt: int = 8,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        micro_train_batch_size: int = 8,
        train_batch_size: Optional[int] = None,
        epochs: int = 1,
        actor_learning_rate: float = 1e-6,
        advantage_estimator: str = "group_norm",
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        kl_in_reward: bool = False,
        loss_agg: str = "token",
        micro_rollout_batch_size: Optional[int] = None,
        lr_scheduler: str = "constant",
        lr_warmup_ratio: float = 0.0,
        min_lr_ratio: float = DEFAULT_MIN_LR_RATIO,
        gradient_checkpointing: bool = False,
        apply_chat_template: bool = False,
        val_samples: int = 0,
        val_temperature: float = 1.0,
        sample_every_n_steps: int = 0,
        reward_clip: float = 0.0,
        reward_running_norm: bool = False,
        reward_running_norm_minus_mean: bool = False,
        advantages_norm: bool = False,
        advantage_clip: float = 0.0,
        overlong_buffer: bool = False,
        overlong_buffer_len: int = 1024,
        overlong_buffer_penalty_factor: float = 1.0,
        dynamic_sampling: bool = False,
        lora: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._check_choice("advantage_estimator", advantage_estimator, self.advantage_estimators)
        self._check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        self._check_choice("loss_agg", loss_agg, LOSS_AGGS)
        owner = type(self).__name__
        counts = {"n_samples_per_prompt": n_samples_per_prompt, "max_new_tokens": max_new_tokens,
                  "micro_train_batch_size": micro_train_batch_size, "epochs": epochs}
        if train_batch_size is not None:
            counts["train_batch_size"] = train_batch_size
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}.{name}={value!r} is invalid; accepted: an integer >= 1")
        numbers = {"kl_coef": kl_coef, "temperature": temperature, "actor_learning_rate": actor_learning_rate}
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{owner}.{name}={value!r} is invalid; accepted: a number >= 0 (finite)")
        counts_or_zero = {"val_samples": val_samples, "sample_every_n_steps": sample_every_n_steps}
        for name, value in counts_or_zero.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{owner}.{name}={value!r} is invalid; accepted: an integer >= 0")
        if not isinstance(apply_chat_template, bool):
            raise ValueError(f"{owner}.apply_chat_template={apply_chat_template!r} is invalid; accepted: True or False")
        if val_samples:
            SamplingParams(n=val_samples, temperature=val_temperature, max_new_tokens=max_new_tokens)
        elif val_temperature != 1.0:
            raise ValueError(f"{owner}.val_temperature={val_temperature!r} is only used with val_samples >= 1 (sampled "
                             "validation); accepted: val_samples >= 1, or the default 1.0")
        check_group_size(advantage_estimator, n_samples_per_prompt, owner)
        self._check_shaping_settings()
        self.reward_moments = RunningMoments()
        SamplingParams(n=n_samples_per_prompt, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self._check_training_settings()
        self.automatic_optimization = False
        if model_config and model != "tiny":
            raise ValueError(f"{owner}.model_config={model_config!r} is only for model='tiny'; accepted: None with "
                             f"model={model!r}")
        path = model if model == "tiny" else model_dir(model)
        if tokenizer is None:
            tokenizer = "char" if model == "tiny" else path
        self.tokenizer = load_tokenizer(tokenizer, tokenizer_chars)
        self.actor = load_causal_lm(path, len(self.tokenizer), model_config)
        self.actor.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.actor.generation_config.eos_token_id = self.tokenizer.eos_token_id
        self.lora = LoRASettings.parse(lora, owner)
        if self.lora is not None:
            apply_lora(self.actor, self.lora, owner)
        # a LoRA actor's reference is its own base (adapters off)
        reference_copy = kl_coef > 0 and self.lora is None
        self.ref = copy.deepcopy(self.actor).eval().requires_grad_(False) if reference_copy else None
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.actor)
        self.reward_fn = CombinedReward(DEFAULT_REWARDS if rewards is None else rewards)

    def _check_shaping_settings(self) -> None:
        hp, owner = self.hparams, type(self).__name__
        flags = ("reward_running_norm", "reward_running_norm_minus_mean", "advantages_norm", "overlong_buffer",
                 "dynamic_sampling")
        for name in flags:
            if not isinstance(hp[name], bool):
                raise ValueError(f"{owner}.{name}={hp[name]!r} is invalid; accepted: True or False")
        for name in ("reward_clip", "advantage_clip", "overlong_buffer_penalty_factor"):
            value = hp[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{owner}.{name}={value!r} is invalid; accepted: a number >= 0 (finite)")
        if hp.reward_running_norm_minus_mean and not hp.reward_running_norm:
            raise ValueError(f"{owner}.reward_running_norm_minus_mean=True needs reward_running_norm=True; accepted: "
                             "reward_running_norm=True, or reward_running_norm_minus_mean=False")
        length = hp.overlong_buffer_len
        if hp.overlong_buffer:
            if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= hp.max_new_tokens:
                raise ValueError(f"{owner}.overlong_buffer_len={length!r} is invalid with max_new_tokens="
                                 f"{hp.max_new_tokens}; accepted: an integer in [1, max_new_tokens]")
        elif length != 1024 or hp.overlong_buffer_penalty_factor != 1.0:
            raise ValueError(f"{owner}.overlong_buffer_len={length!r} / overlong_buffer_penalty_factor="
                             f"{hp.overlong_buffer_penalty_factor!r} are only used with overlong_buffer=True; accepted: "
                             "overlong_buffer=True, or both left at their defaults (1024, 1.0)")
        if hp.dynamic_sampling and hp.n_samples_per_prompt < 2:
            raise ValueError(f"{owner}.dynamic_sampling=True needs prompt groups: n_samples_per_prompt="
                             f"{hp.n_samples_per_prompt!r}; accepted: n_samples_per_prompt >= 2, or dynamic_sampling=False")

    SHAPING_SETTINGS = ("reward_clip", "reward_running_norm", "reward_running_norm_minus_mean", "advantages_norm",
                        "advantage_clip", "overlong_buffer", "overlong_buffer_len", "overlong_buffer_penalty_factor",
                        "dynamic_sampling")

    def _shape_rewards(self, rewards: Tensor, exp: "Experience", metrics: dict[str, Any]) -> Tensor:
        """LightRFT's reward shaping on the sequence rewards: overlong penalty, running normalization,
        clip (each when enabled)."""
        hp = self.hparams
        if hp.overlong_buffer:
            penalty = overlong_penalty(exp.action_mask.sum(dim=1), hp.max_new_tokens, hp.overlong_buffer_len,
                                       hp.overlong_buffer_penalty_factor).to(rewards.dtype)
            rewards = rewards + penalty
            metrics["overlong/penalty"] = float(penalty.mean())
        if hp.reward_running_norm:
            self.reward_moments.update(rewards, self._all_reduce_sum)
            std = max(self.reward_moments.std, 1e-8)
            rewards = (rewards - self.reward_moments.mean) / std if hp.reward_running_norm_minus_mean else rewards / std
        if hp.reward_clip > 0:
            rewards = rewards.clamp(-hp.reward_clip, hp.reward_clip)
        if hp.overlong_buffer or hp.reward_running_norm or hp.reward_clip > 0:
            metrics["reward_shaped"] = float(rewards.mean())
        return rewards

    def _shape_advantages(self, exp: "Experience", raw_rewards: Tensor, metrics: dict[str, Any],
                          norm: Optional[bool] = None) -> None:
        """Dynamic sampling (mask the groups whose raw rewards all tie), then advantage normalization
        and clip, on ``exp.advantages`` in place."""
        hp = self.hparams
        if hp.dynamic_sampling:
            keep = ~tied_groups(raw_rewards, hp.n_samples_per_prompt)
            exp.action_mask = exp.action_mask * keep[:, None].to(exp.action_mask.dtype)
            exp.advantages = exp.advantages * exp.action_mask
            metrics["dynamic_sampling/kept"] = float(keep.float().mean())
        norm = hp.advantages_norm if norm is None else norm
        exp.advantages, frac = normalize_and_clip(exp.advantages, exp.action_mask, norm, hp.advantage_clip,
                                                  self._all_reduce_sum)
        if hp.advantage_clip > 0:
            metrics["advantage_clip_frac"] = float(frac)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.hparams.reward_running_norm:
            checkpoint["reward_running_moments"] = self.reward_moments.state_dict()
        if self.lora is not None:  # adapters only: the frozen base is rebuilt from `model`
            frozen = frozen_base_keys(self)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "reward_running_moments" in checkpoint:
            self.reward_moments.load_state_dict(checkpoint["reward_running_moments"])
        if self.lora is not None and "state_dict" in checkpoint:
            # an adapters-only checkpoint: the base keeps the weights it was built with
            state = checkpoint["state_dict"]
            frozen = frozen_base_keys(self) - state.keys()
            state.update({k: v for k, v in self.state_dict().items() if k in frozen})

    def _check_choice(self, name: str, value: str, accepted: tuple[str, ...]) -> None:
        if value not in accepted:
            raise ValueError(f"{type(self).__name__}.{name}={value!r} is invalid; accepted: {', '.join(accepted)}")

    def _check_training_settings(self) -> None:
        hp, owner = self.hparams, type(self).__name__
        self._check_choice("lr_scheduler", hp.lr_scheduler, LR_SCHEDULERS)
        for name in ("lr_warmup_ratio", "min_lr_ratio"):
            value = hp[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{owner}.{name}={value!r} is invalid; accepted: a number in [0, 1]")
        if hp.lr_scheduler != "cosine" and hp.min_lr_ratio != DEFAULT_MIN_LR_RATIO:
            raise ValueError(f"{owner}.min_lr_ratio={hp.min_lr_ratio!r} is only used by lr_scheduler='cosine', and "
                             f"lr_scheduler={hp.lr_scheduler!r}; accepted: lr_scheduler='cosine', or min_lr_ratio left "
                             f"at {DEFAULT_MIN_LR_RATIO}")
        size = hp.micro_rollout_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{owner}.micro_rollout_batch_size={size!r} is invalid; accepted: None or an integer >= 1")
        if not isinstance(hp.gradient_checkpointing, bool):
            raise ValueError(f"{owner}.gradient_checkpointing={hp.gradient_checkpointing!r} is invalid; "
                             "accepted: True or False")

    @property
    def has_reference(self) -> bool:
        """Whether a KL reference is scored: a frozen copy of the actor, or a LoRA actor's own base."""
        return self.hparams.kl_coef > 0

    @property
    def micro_rollout_batch_size(self) -> int:
        """Samples per no-grad scoring forward of a rollout."""
        return self.hparams.micro_rollout_batch_size or self.hparams.micro_train_batch_size

    # ------------------------------------------------------------------ setup
    def configure_callbacks(self) -> list[pl.Callback]:
        """Add a rollout-engine callback (an in-process HF engine) unless the Trainer has one."""
        from lightrft_lightning.callbacks import RolloutEngineCallback

        if any(isinstance(cb, RolloutEngineCallback) for cb in self.trainer.callbacks):
            return []
        return [RolloutEngineCallback(pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)]

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if not isinstance(strategy, StrategyBase):
            raise ValueError(f"{type(self).__name__} needs a LightRFT strategy, got {type(strategy).__name__}; "
                             "accepted: 'lightrft_fake', 'lightrft_fsdp', 'lightrft_deepspeed' or a StrategyBase subclass")
        if stage != "fit":
            return
        world = strategy.dp_world_size
        train_batch_size = self.hparams.train_batch_size
        prompts = getattr(self.trainer.datamodule, "batch_size", None)
        if train_batch_size is None:
            if prompts is None:
                raise ValueError(f"{type(self).__name__}.train_batch_size is None and the prompts' batch size is "
                                 "unknown (no datamodule with batch_size); accepted: an integer")
            train_batch_size = prompts * self.hparams.n_samples_per_prompt * world
        # without a datamodule that knows its batch size, the config's rollout_batch_size says (checked per step)
        settings = {
            "rollout_batch_size": prompts * world if prompts is not None else strategy.config.rollout_batch_size,
            "micro_rollout_batch_size": self.micro_rollout_batch_size,
            "lr_warmup_ratio": self.hparams.lr_warmup_ratio,
            "gradient_checkpointing": self.hparams.gradient_checkpointing,
            **{name: self.hparams[name] for name in self.SHAPING_SETTINGS},
            "advantage_estimator": self.hparams.advantage_estimator,
            **self._strategy_settings(),
        }
        self._check_config_agrees(strategy.config, settings)
        # the module's sizes are the ones the strategy accumulates with (and DeepSpeed is configured with)
        strategy.config = dataclasses.replace(
            strategy.config,
            micro_train_batch_size=self.hparams.micro_train_batch_size,
            train_batch_size=train_batch_size,
            n_samples_per_prompt=self.hparams.n_samples_per_prompt,
            actor_learning_rate=self.hparams.actor_learning_rate,
            kl_estimator=self.hparams.kl_estimator,
            init_kl_coef=self.hparams.kl_coef,
            **settings,
        )
        steps = strategy.config.accumulation_steps(world)  # raises if the sizes do not divide
        if prompts is not None:
            self._check_rollout_size(prompts * self.hparams.n_samples_per_prompt, steps)
        if strategy.accumulation_steps != steps:
            raise ValueError(f"{type(strategy).__name__} accumulates {strategy.accumulation_steps} micro-batches, not the "
                             f"{steps} of the module's batch sizes; build the strategy with a config "
                             "(trainer.strategy.init_args.config) so that it follows StrategyConfig")

    def _strategy_settings(self) -> dict[str, Any]:
        """Further ``StrategyConfig`` fields this module sets under a Trainer (a subclass's own)."""
        return {}

    def _check_config_agrees(self, config: StrategyConfig, settings: dict[str, Any]) -> None:
        """A strategy config value that is neither the default nor the module's would be overwritten."""
        defaults = {f.name: f.default for f in dataclasses.fields(StrategyConfig)}
        for name, value in settings.items():
            given = getattr(config, name)
            if given != defaults[name] and given != value:
                source = ("prompts per step x ranks" if name == "rollout_batch_size"
                          else f"{type(self).__name__}.{name}")
                raise ValueError(f"StrategyConfig.{name}={given!r} (the strategy's config) disagrees with the "
                                 f"module's {value!r} ({source}), which is the one used under a Trainer; accepted: "
                                 f"{value!r} or the default {defaults[name]!r}")

    def configure_optimizers(self) -> Any:
        """The actor's AdamW and its learning-rate schedule (see :meth:`lr_scheduler_config`)."""
        # under a Trainer the strategy wraps the module's children itself (shards them, or builds
        # DeepSpeed engines for them), frozen ones (reference, reward models) for inference
        optimizer = self.trainer.strategy.create_optimizer(self.actor, lr=self.hparams.actor_learning_rate)
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_config(optimizer, "actor")}

    def lr_scheduler_config(self, optimizer: Optimizer, name: str) -> dict[str, Any]:
        """A Lightning scheduler config for ``optimizer``: warmup over ``lr_warmup_ratio`` of
        :meth:`num_optimizer_steps`, then ``lr_scheduler``. Under manual optimization Lightning saves and
        restores it but does not step it: ``training_step`` hands it to ``strategy.optimizer_step``,
        which steps it after each real optimizer step (DeepSpeed: the engine does)."""
        from transformers.optimization import (get_constant_schedule_with_warmup,
                                               get_cosine_with_min_lr_schedule_with_warmup)

        hp = self.hparams
        total = self.num_optimizer_steps() if hp.lr_scheduler == "cosine" or hp.lr_warmup_ratio > 0 else 0
        warmup = math.ceil(total * hp.lr_warmup_ratio)
        if hp.lr_scheduler == "cosine":
            scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total,
                                                                    min_lr_rate=hp.min_lr_ratio)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
        return {"scheduler": scheduler, "interval": "step", "name": f"{name}/lr"}

    def num_optimizer_steps(self) -> int:
        """Optimizer steps of each trained model over the fit: ``trainer.estimated_stepping_batches``
        (training steps: ``max_steps``, or epochs x batches) x the steps of one training step,
        ``epochs`` x ``rollout_batch_size`` x ``n_samples_per_prompt`` / ``train_batch_size`` (the
        sizes :meth:`setup` wrote into ``strategy.config``)."""
        hp = self.hparams
        steps = self.trainer.estimated_stepping_batches
        if steps == float("inf"):
            raise ValueError(f"{type(self).__name__}.lr_scheduler={hp.lr_scheduler!r} with lr_warmup_ratio="
                             f"{hp.lr_warmup_ratio!r} needs the number of training steps, and this Trainer has no end; "
                             "accepted: Trainer(max_steps=...) or max_epochs, or lr_scheduler='constant' with "
                             "lr_warmup_ratio=0")
        config = self.trainer.strategy.config
        per_step = hp.epochs * config.rollout_batch_size * config.n_samples_per_prompt // config.train_batch_size
        return int(steps) * per_step

    # ------------------------------------------------------------------ rollout
    def _all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return self.trainer.strategy.all_reduce(tensor, op="sum")

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        from lightrft_lightning.callbacks import find_rollout_callback

        return find_rollout_callback(self.trainer).generate(self, prompt_ids, params)

    def _pack(self, prompt_ids: list[list[int]], completions: list[Completion]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded prompt+response ids, attention mask and the ``[N, L-1]`` response mask."""
        seqs = [prompt_ids[c.prompt_index] + list(c.token_ids) for c in completions]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        action = torch.zeros((len(seqs), length - 1), dtype=torch.float32)
        for i, (seq, c) in enumerate(zip(seqs, completions)):
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
            start = len(prompt_ids[c.prompt_index]) - 1
            action[i, start: start + len(c.token_ids)] = 1
        return ids.to(self.device), attn.to(self.device), action.to(self.device)

    def _train_and_log(self, exp: Experience, rewards: Tensor, metrics: dict[str, Any], start: float) -> None:
        """Run the optimization epochs (``self._train``) on a scored rollout, then log reward,
        advantage, response-length and timing metrics with the training metrics."""
        train_start = time.perf_counter()
        metrics.update(self._train(exp))
        end = time.perf_counter()
        tokens = exp.action_mask.sum()
        metrics.update(self._stats("reward", rewards, torch.ones_like(rewards)))
        metrics.update(self._stats("adv", exp.advantages, exp.action_mask))
        metrics.update({"response_length": tokens / len(exp), "time/train": end - train_start,
                        "perf/tokens_per_s": tokens / (end - start)})
        self._log_metrics(metrics)

    def _policy_terms(self, exp: Experience) -> Iterator[PolicyTerms]:
        """For each micro-batch of each optimization epoch: the actor's log-probs and entropy and the
        clipped policy loss, aggregated so that accumulated micro-batches add up to the step's loss.

        Without a reference model the loss is the clipped term alone, so samples whose advantage is 0
        on every token are not forwarded (their log-probs are 0; entropy and clip fraction are over
        the samples trained): the loss and its gradient are the same."""
        hp = self.hparams
        accumulation = self.trainer.strategy.accumulation_steps
        normalizer = self._token_normalizer(exp) if hp.loss_agg == "token" else None
        for _ in range(hp.epochs):
            for i, mb in enumerate(self._micro_batches(exp)):
                agg: dict[str, Any] = {}
                if normalizer is not None:
                    agg["num_tokens"] = normalizer[i // accumulation]
                elif hp.loss_agg == "constant":
                    agg["max_len"] = hp.max_new_tokens
                mask = mb.action_mask if self.has_reference else _with_advantage(mb.action_mask, mb.advantages)
                logp, entropy = self.log_probs(self.actor, mb.input_ids, mb.attention_mask, entropy=True,
                                               action_mask=mask)
                old_logp = logp.detach() if mb.old_logp is None else mb.old_logp
                loss, clip_frac = policy_loss(logp, old_logp, mb.advantages, mask,
                                              self.clip_low, self.clip_high, hp.loss_agg, **agg)
                mean_entropy = ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
                yield PolicyTerms(mb, agg, logp, loss, clip_frac.item(), mean_entropy)

    def _micro_batches(self, exp: Experience, size: Optional[int] = None) -> Iterator[Experience]:
        size = size or self.hparams.micro_train_batch_size
        for start in range(0, len(exp), size):
            yield exp.slice(start, start + size)

    def log_probs(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, entropy: bool = False,
                  action_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Log-probs of each next token under ``model`` (at the sampling temperature), ``[N, L-1]``,
        and the entropy of each next-token distribution when asked. With ``action_mask`` (Hugging Face
        causal LMs) the forward does less, and only the positions it marks are meaningful (those before
        the first response are 0): rows it marks nowhere are not forwarded (their log-probs are 0), the
        samples of a prompt run as one packed sequence when that saves compute (the prompt forwarded
        once, every unmarked position 0; see :mod:`~lightrft_lightning.algorithms.packing`), and the LM
        head runs only from the first response position on (``logits_to_keep``: prompts hold most
        tokens, and the vocabulary projection is a large share of the forward)."""
        inner = _causal_lm(model) if action_mask is not None else None
        rows = action_mask.bool().any(1) if inner is not None else None
        if rows is not None and 0 < int(rows.sum()) < len(rows):
            logp, ent = self.log_probs(model, input_ids[rows], attention_mask[rows], entropy, action_mask[rows])
            shape = (input_ids.shape[0], input_ids.shape[1] - 1)
            logp = logp.new_zeros(shape).index_put((rows,), logp)
            return logp, ent.new_zeros(shape).index_put((rows,), ent) if ent is not None else None
        config = getattr(inner, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            packed = pack_shared_prompts(input_ids, action_mask, config)
            if packed is not None:
                return self._packed_log_probs(model, packed, input_ids.shape, entropy)
        start = _first_action(action_mask) if inner is not None else 0
        keep = {"logits_to_keep": input_ids.shape[1] - start} if 0 < start < input_ids.shape[1] - 1 else {}
        start = start if keep else 0
        # no KV cache: nothing decodes from it (and checkpointed layers would refuse it)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **keep).logits[:, :-1]
        logp, ent = self._token_log_probs(logits, input_ids[:, start + 1:], entropy)
        if start:
            logp = nn.functional.pad(logp, (start, 0))
            ent = nn.functional.pad(ent, (start, 0)) if ent is not None else None
        return logp, ent

    def _packed_log_probs(self, model: nn.Module, packed: SharedPromptBatch, shape: torch.Size,
                          entropy: bool) -> tuple[Tensor, Optional[Tensor]]:
        start = packed.first_prediction
        width = packed.input_ids.shape[1]
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                       attention_mask=packed.attention_mask, use_cache=False, logits_to_keep=width - start).logits
        logp, ent = self._token_log_probs(logits[packed.group, packed.position - start], packed.target, entropy)
        index = (packed.row, packed.column)
        logp = logp.new_zeros(shape[0], shape[1] - 1).index_put(index, logp)
        ent = ent.new_zeros(shape[0], shape[1] - 1).index_put(index, ent) if ent is not None else None
        return logp, ent

    def _token_log_probs(self, logits: Tensor, targets: Tensor, entropy: bool) -> tuple[Tensor, Optional[Tensor]]:
        """The log-prob of each target under ``logits`` at the sampling temperature, and the entropy."""
        logits = logits.float()
        if self.hparams.temperature > 0 and self.hparams.temperature != 1.0:
            logits = logits / self.hparams.temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1).detach() if entropy else None
        return logp, ent

    @torch.no_grad()
    def _score(self, exp: Experience, model: nn.Module) -> Tensor:
        return torch.cat([self.log_probs(model, mb.input_ids, mb.attention_mask, action_mask=mb.action_mask)[0]
                          for mb in self._micro_batches(exp, self.micro_rollout_batch_size)])

    def _score_base(self, exp: Experience) -> Tensor:
        """The log-probs of a LoRA actor's base model (adapters off, eval mode)."""
        self.actor.eval()
        try:
            with adapters_disabled(self.actor):
                return self._score(exp, self.actor)
        finally:
            self.actor.train()

    def _decode(self, completions: list[Completion]) -> list[str]:
        return self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)

    @torch.no_grad()
    def _rollout(self, batch: dict[str, Any]) -> tuple[Experience, Tensor, dict[str, float]]:
        """Generate, score with the actor (and reference), and compute rewards. Returns the experience,
        the sequence rewards and timings."""
        batch = batch["rows"]
        n = self.hparams.n_samples_per_prompt
        self._check_prompts_per_step(len(batch))
        prompts, prompt_ids = render_prompts(batch, self.tokenizer, self.hparams.apply_chat_template)
        t0 = time.perf_counter()
        params = SamplingParams(n=n, temperature=self.hparams.temperature, top_p=self.hparams.top_p,
                                max_new_tokens=self.hparams.max_new_tokens)
        completions = self._generate(prompt_ids, params)
        t1 = time.perf_counter()
        if len(completions) != len(prompts) * n:
            raise RuntimeError(f"the rollout engine returned {len(completions)} completions for {len(prompts)} "
                               f"prompts x n={n}")
        ids, attn, action = self._pack(prompt_ids, completions)
        exp = Experience(ids, attn, action)
        if not self._on_policy(len(exp)):
            self.actor.eval()
            exp.old_logp = self._score(exp, self.actor)
            self.actor.train()
        if self.ref is not None:
            exp.ref_logp = self._score(exp, self.ref)
        elif self.has_reference:
            exp.ref_logp = self._score_base(exp)
        meta = [_metadata(batch[c.prompt_index]) for c in completions]
        texts = self._decode(completions)
        scores = self.reward_fn.scores([prompts[c.prompt_index] for c in completions], texts, meta)
        rewards = self.reward_fn.combine(scores)
        metrics = {"time/generate": t1 - t0, "time/score": time.perf_counter() - t1,
                   **self._rollout_metrics(scores, rewards, completions)}
        self._write_samples([prompts[c.prompt_index] for c in completions], texts, rewards)
        return exp, rewards.to(self.device), metrics

    def _rollout_metrics(self, scores: dict[str, Tensor], rewards: Tensor, completions: list[Completion]) -> dict[str, float]:
        """Each reward's mean, the fraction of prompts whose samples all score the same (no learning
        signal under group baselines) and the fraction of completions cut at ``max_new_tokens``."""
        names = self.reward_fn.short_names()
        metrics = {f"reward/{names[name]}": float(values.mean()) for name, values in scores.items()}
        groups = rewards.view(-1, self.hparams.n_samples_per_prompt)
        metrics["groups/all_tied"] = float((groups == groups[:, :1]).all(dim=1).float().mean())
        metrics["response/truncated"] = sum(c.finish_reason == "length" for c in completions) / len(completions)
        return metrics

    def _write_samples(self, prompts: list[str], completions: list[str], rewards: Tensor, keep: int = 4) -> None:
        """Every ``sample_every_n_steps`` steps: ``keep`` samples to ``<log_dir>/samples.jsonl`` (rank 0)
        and to loggers with ``log_text``."""
        every = self.hparams.sample_every_n_steps
        if not every or self.trainer.global_step % every or not self.trainer.is_global_zero:
            return
        rows = [{"step": self.trainer.global_step, "prompt": p, "completion": c, "reward": float(r)}
                for p, c, r in list(zip(prompts, completions, rewards))[:keep]]
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "samples.jsonl"), "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(key="samples", columns=list(rows[0]), data=[list(r.values()) for r in rows],
                                step=self.trainer.global_step)

    def _check_prompts_per_step(self, prompts: int) -> None:
        strategy = self.trainer.strategy
        expected = strategy.config.rollout_batch_size
        if prompts * strategy.dp_world_size != expected:
            raise ValueError(f"this step has {prompts} prompts x {strategy.dp_world_size} ranks, but "
                             f"StrategyConfig.rollout_batch_size={expected} (the length of the learning-rate schedule "
                             f"counts on it); accepted: batches of rollout_batch_size / ranks prompts (a datamodule "
                             f"with a batch_size sets it)")

    # ------------------------------------------------------------------ training
    def _on_policy(self, samples: int) -> bool:
        """One pass and one optimizer step per rollout: the rollout policy is the policy being
        trained, so its log-probs are the detached ones of the training forward (one forward saved)."""
        strategy = self.trainer.strategy
        kl_in_reward = self.has_reference and self.hparams.kl_in_reward
        return (self.hparams.epochs == 1 and not kl_in_reward
                and samples == strategy.accumulation_steps * self.hparams.micro_train_batch_size)

    def _check_rollout_size(self, samples: int, accumulation: int) -> int:
        step_size = accumulation * self.hparams.micro_train_batch_size
        if samples % step_size:
            raise ValueError(f"a rollout of {samples} samples per rank does not split into optimizer steps of "
                             f"{step_size} (micro_train_batch_size x accumulation); accepted: a train_batch_size "
                             "that divides prompts per step x n_samples_per_prompt x ranks")
        return step_size

    def _token_normalizer(self, exp: Experience) -> float:
        """Tokens per micro-batch over the optimizer step, so that summing micro-batch losses (as the
        strategy does, after dividing by accumulation steps and averaging over ranks) gives the
        exact token mean of the step."""
        strategy = self.trainer.strategy
        accumulation = strategy.accumulation_steps
        step_size = self._check_rollout_size(len(exp), accumulation)
        counts = exp.action_mask.view(-1, step_size, exp.action_mask.shape[1]).sum(dim=(1, 2))
        counts = self._all_reduce_sum(counts).clamp(min=1)  # dynamic sampling may mask a whole step
        return counts / (accumulation * strategy.dp_world_size)

    def _kl(self, logp: Tensor, ref_logp: Optional[Tensor]) -> Optional[Tensor]:
        return None if ref_logp is None else kl_penalty(logp, ref_logp, self.hparams.kl_estimator)

    def _stats(self, name: str, x: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Mean and std of the masked entries of ``x`` over all ranks (``name`` and ``name_std``)."""
        s = self._all_reduce_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).float())
        mean = s[0] / s[2]
        return {name: mean, f"{name}_std": (s[1] / s[2] - mean**2).clamp(min=0).sqrt()}

    def _log_metrics(self, metrics: dict[str, Any]) -> None:
        """Log ``metrics`` (the mean over ranks; reward and advantage stats are already global)."""
        values = {k: float(v) for k, v in metrics.items()}
        local = {k: v for k, v in values.items() if k not in _GLOBAL_METRICS}
        values.update(self.trainer.strategy.all_reduce(local, op="mean"))
        for key, value in values.items():
            self.log(key, value, prog_bar=key in ("reward", "kl"), batch_size=1)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy completions (one per prompt) and, with ``val_samples``, sampled ones, generated by the
        actor itself (no engine is needed, so ``validate`` runs outside ``fit``). Logs ``val/reward``,
        ``val/accuracy`` and ``val/mean@n``, averaged over all validation prompts."""
        rows = batch["rows"]
        prompts, prompt_ids = render_prompts(rows, self.tokenizer, self.hparams.apply_chat_template)
        meta = [_metadata(row) for row in rows]
        first = self.reward_fn.names[0]
        greedy = self._actor_generate(prompt_ids, num=1, do_sample=False)
        scores = self.reward_fn.scores(prompts, greedy, meta)
        log = {"val/reward": self.reward_fn.combine(scores).mean().item(), "val/accuracy": scores[first].mean().item()}
        n = self.hparams.val_samples
        if n:
            sampled = self._actor_generate(prompt_ids, num=n, do_sample=True)
            repeat = [i for i in range(len(rows)) for _ in range(n)]
            log[f"val/mean@{n}"] = self.reward_fn.scores([prompts[i] for i in repeat], sampled,
                                                         [meta[i] for i in repeat])[first].mean().item()
        for key, value in log.items():
            self.log(key, value, prog_bar=key == "val/accuracy", batch_size=len(rows), sync_dist=False)

    def _actor_generate(self, prompt_ids: list[list[int]], num: int, do_sample: bool) -> list[str]:
        width = max(map(len, prompt_ids))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=self.device)
        sampling: dict[str, Any] = {"do_sample": False}
        if do_sample:
            sampling = {"do_sample": True, "temperature": self.hparams.val_temperature, "top_p": 1.0, "top_k": 0}
        out = hf_model(self.actor).generate(input_ids=ids, attention_mask=mask, num_return_sequences=num,
                                            max_new_tokens=self.hparams.max_new_tokens, pad_token_id=pad,
                                            eos_token_id=self.tokenizer.eos_token_id, **sampling)
        return self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    """What a reward function gets besides the prompt and the completion: the row's other fields."""
    return {k: v for k, v in row.items() if k not in ("prompt", "messages")}


def _with_advantage(action_mask: Tensor, advantages: Tensor) -> Tensor:
    """``action_mask`` without the samples whose advantage is 0 on every token, which add exactly 0 to
    the clipped policy loss and its gradient (a GRPO group whose rewards all tie): their forward is
    skipped. One sample stays when no other would, so that the micro-batch still has a backward."""
    trained = ((advantages != 0) & action_mask.bool()).any(1)
    if not trained.any():
        trained = action_mask.bool().any(1)
        trained &= trained.cumsum(0) == 1
    return action_mask * trained[:, None].to(action_mask.dtype)


def _first_action(action_mask: Tensor) -> int:
    """The first position any row of ``action_mask`` marks (its width when none does)."""
    used = action_mask.any(0).nonzero()
    return int(used[0]) if len(used) else action_mask.shape[1]


def _causal_lm(model: nn.Module) -> Optional[nn.Module]:
    """``model`` (a DeepSpeed engine's: its module) when its forward takes ``logits_to_keep``, as Hugging
    Face causal LMs do; else None."""
    inner = getattr(model, "module", None)
    target = inner if isinstance(inner, nn.Module) else model
    return target if "logits_to_keep" in inspect.signature(target.forward).parameters else None
