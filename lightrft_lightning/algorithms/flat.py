"""The flat arguments of :class:`~lightrft_lightning.algorithms.GRPO` and
:class:`~lightrft_lightning.algorithms.PPO`, turned into :class:`~lightrft_lightning.algorithms.RLModule`'s parts."""

from __future__ import annotations

from typing import Any, Callable, Optional

from lightrft_lightning.algorithms.advantages import Advantages
from lightrft_lightning.algorithms.losses import ClippedPolicyLoss
from lightrft_lightning.algorithms.models import Policy
from lightrft_lightning.algorithms.training import DEFAULT_MIN_LR_RATIO, Training
from lightrft_lightning.algorithms.refill import DEFAULT_MAX_NUM_GEN_BATCHES, RefillRollout
from lightrft_lightning.algorithms.async_rollout import AsyncRollout
from lightrft_lightning.algorithms.rollout import Rollout

DYNAMIC_SAMPLING_MODES = ("mask", "refill")


def flat_parts(
    loss: Callable[..., ClippedPolicyLoss],
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
    policy_loss_type: str = "ppo",
    rollout_is: Optional[str] = None,
    rollout_is_threshold: float = 2.0,
    rollout_rs: Optional[str] = None,
    rollout_rs_threshold: float = 2.0,
    rollout_rs_threshold_lower: Optional[float] = None,
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
    dynamic_sampling_mode: str = "mask",
    max_num_gen_batches: int = DEFAULT_MAX_NUM_GEN_BATCHES,
    batch_multiplier: float = 1.0,
    max_off_policy_steps: int = 0,
    in_flight: str = "finish",
    lora: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The keyword arguments of :class:`~lightrft_lightning.algorithms.RLModule` from flat ones: each flat
    argument is the field of the same name of :class:`~lightrft_lightning.algorithms.models.Policy`
    (model, tokenizer, tokenizer_chars, model_config, lora, gradient_checkpointing),
    :class:`~lightrft_lightning.algorithms.rollout.Rollout` (rewards, n_samples_per_prompt, max_new_tokens,
    temperature, top_p, apply_chat_template, sample_every_n_steps; with dynamic_sampling_mode="refill" a
    :class:`~lightrft_lightning.algorithms.refill.RefillRollout`, which also takes max_num_gen_batches and
    batch_multiplier),
    :class:`~lightrft_lightning.algorithms.advantages.Advantages` (``advantage_estimator`` is its
    ``estimator``; the shaping settings), the loss (kl_coef, kl_estimator, kl_in_reward,
    loss_agg, policy_loss_type and the rollout correction's rollout_is* / rollout_rs*: ``loss`` builds it
    from them; :class:`~lightrft_lightning.algorithms.losses.ClippedPolicyLoss`) and :class:`~lightrft_lightning.algorithms.training.Training`
    (the batch sizes, epochs, learning rate and schedule); val_samples and val_temperature are RLModule's own.
    The parts' docstrings say more.

    Args:
        loss: builds the loss from kl_coef, kl_estimator, kl_in_reward, loss_agg, policy_loss_type and
            the rollout correction's settings.
        model: "tiny", a built-in name ("smollm2-135m-instruct") or a local Hugging Face directory.
        tokenizer: "char", a built-in model name or a local directory (None: the model's own).
        tokenizer_chars: the characters of the "char" tokenizer.
        model_config: overrides of the tiny model's config.
        rewards: {"package.module:function" or reward-model directory: weight}.
        n_samples_per_prompt: completions sampled per prompt.
        max_new_tokens: sampling: the longest completion.
        temperature: sampling temperature (also of the trained log-probs).
        top_p: sampling nucleus.
        micro_train_batch_size: samples per forward/backward.
        train_batch_size: samples per optimizer step over all ranks (None: a whole rollout).
        epochs: optimization passes over each rollout.
        actor_learning_rate: AdamW learning rate of the policy.
        advantage_estimator: the advantage estimator (see ``ESTIMATORS`` in ``algorithms.advantages``).
        kl_coef: weight of KL(policy || reference); 0 builds no reference model.
        kl_estimator: "k1", "k2" or "k3".
        kl_in_reward: subtract the KL from the reward instead of adding it to the loss.
        loss_agg: "token" (DAPO), "sequence" or "constant" (Dr.GRPO).
        policy_loss_type: "ppo" (token ratios) or "gspo" (one length-normalized ratio per sequence).
        rollout_is: truncated importance sampling of the engine's samples, None (off), "token",
            "sequence" or "geometric": weight min(pi_old / mu, rollout_is_threshold).
        rollout_is_threshold: its cap.
        rollout_rs: masked importance sampling, None (off), "token", "sequence" or "geometric": drop
            what has pi_old / mu outside [rollout_rs_threshold_lower, rollout_rs_threshold].
        rollout_rs_threshold, rollout_rs_threshold_lower: that range (lower default: 1 / upper).
        micro_rollout_batch_size: samples per no-grad scoring forward (None: micro_train_batch_size).
        lr_scheduler: "constant" or "cosine", after warmup.
        lr_warmup_ratio: the fraction of the optimizer steps with a linear warmup from 0.
        min_lr_ratio: where the cosine ends, as a fraction of the learning rate.
        gradient_checkpointing: recompute layer activations in the backward pass.
        apply_chat_template: render "prompt" rows with the tokenizer's chat template.
        val_samples: sampled validation completions per prompt besides the greedy one (0: greedy only).
        val_temperature: the temperature of those samples.
        sample_every_n_steps: write a few samples to samples.jsonl every this many steps (0: never).
        reward_clip: clip sequence rewards to [-reward_clip, reward_clip] (0: off).
        reward_running_norm: divide rewards by the running std of all rewards seen.
        reward_running_norm_minus_mean: also subtract their running mean.
        advantages_norm: whiten the advantages over the response tokens of all ranks.
        advantage_clip: clip advantages to [-advantage_clip, advantage_clip] (0: off).
        overlong_buffer: DAPO's soft overlong punishment.
        overlong_buffer_len: its buffer, in tokens before max_new_tokens.
        overlong_buffer_penalty_factor: its largest penalty.
        dynamic_sampling: DAPO's dynamic sampling of prompt groups whose rewards all tie.
        dynamic_sampling_mode: "mask": leave those groups out of the loss (LightRFT's); "refill":
            over-sample and generate again until the step holds as many groups with signal as prompts
            (:class:`~lightrft_lightning.algorithms.refill.RefillRollout`).
        max_num_gen_batches: "refill": generations per step at most.
        batch_multiplier: "refill": the first generation's prompts as a multiple of the step's.
        max_off_policy_steps: >= 1: asynchronous rollouts on a server engine, at most this many weight versions
            behind (:class:`~lightrft_lightning.algorithms.async_rollout.AsyncRollout`; truncated importance
            sampling on unless a correction is set); 0: synchronous.
        in_flight: what a weight push does to the requests generating (max_off_policy_steps >= 1): "finish"
            (default), "keep" (partial rollouts) or "abort" (generated again); see AsyncRollout.
        lora: {r, alpha, dropout, target_modules}: train LoRA adapters of the actor.
    """
    owner = getattr(loss, "func", loss).__name__.removesuffix("Loss")
    rollout_args = dict(rewards=rewards, n_samples_per_prompt=n_samples_per_prompt, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, apply_chat_template=apply_chat_template,
                        sample_every_n_steps=sample_every_n_steps)
    if dynamic_sampling_mode not in DYNAMIC_SAMPLING_MODES:
        raise ValueError(f"{owner}.dynamic_sampling_mode={dynamic_sampling_mode!r} is invalid; accepted: "
                         f"{', '.join(map(repr, DYNAMIC_SAMPLING_MODES))}")
    if dynamic_sampling_mode == "refill":
        if dynamic_sampling is not True:
            raise ValueError(f"{owner}.dynamic_sampling_mode='refill' is only used with dynamic_sampling=True, and "
                             f"dynamic_sampling={dynamic_sampling!r}; accepted: dynamic_sampling=True, or "
                             "dynamic_sampling_mode='mask'")
        rollout: Rollout = RefillRollout(max_num_gen_batches=max_num_gen_batches, batch_multiplier=batch_multiplier,
                                         **rollout_args)
    else:
        if max_num_gen_batches != DEFAULT_MAX_NUM_GEN_BATCHES or batch_multiplier != 1.0:
            raise ValueError(f"{owner}.max_num_gen_batches={max_num_gen_batches!r} / batch_multiplier="
                             f"{batch_multiplier!r} are only used with dynamic_sampling_mode='refill'; accepted: "
                             f"dynamic_sampling=True with dynamic_sampling_mode='refill', or both left at their "
                             f"defaults ({DEFAULT_MAX_NUM_GEN_BATCHES}, 1.0)")
        rollout = Rollout(**rollout_args)
    if max_off_policy_steps != 0:
        if dynamic_sampling_mode == "refill":
            raise ValueError(f"{owner}.max_off_policy_steps={max_off_policy_steps!r} with dynamic_sampling_mode='refill': "
                             "an asynchronous rollout does not refill; accepted: max_off_policy_steps=0, or "
                             "dynamic_sampling_mode='mask'")
        rollout = AsyncRollout(max_off_policy_steps=max_off_policy_steps, in_flight=in_flight, **rollout_args)
    elif in_flight != "finish":
        raise ValueError(f"{owner}.in_flight={in_flight!r} is only used by an asynchronous rollout, and "
                         "max_off_policy_steps=0; accepted: max_off_policy_steps >= 1, or in_flight='finish'")
    return {
        "policy": Policy(model=model, tokenizer=tokenizer, tokenizer_chars=tokenizer_chars, model_config=model_config,
                         lora=lora, gradient_checkpointing=gradient_checkpointing),
        "rollout": rollout,
        "advantages": Advantages(
            estimator=advantage_estimator, reward_clip=reward_clip, reward_running_norm=reward_running_norm,
            reward_running_norm_minus_mean=reward_running_norm_minus_mean, advantages_norm=advantages_norm,
            advantage_clip=advantage_clip, overlong_buffer=overlong_buffer, overlong_buffer_len=overlong_buffer_len,
            overlong_buffer_penalty_factor=overlong_buffer_penalty_factor, dynamic_sampling=dynamic_sampling),
        "loss": loss(kl_coef=kl_coef, kl_estimator=kl_estimator, kl_in_reward=kl_in_reward, loss_agg=loss_agg,
                     policy_loss_type=policy_loss_type, rollout_is=rollout_is, rollout_is_threshold=rollout_is_threshold,
                     rollout_rs=rollout_rs, rollout_rs_threshold=rollout_rs_threshold,
                     rollout_rs_threshold_lower=rollout_rs_threshold_lower),
        "training": Training(micro_train_batch_size=micro_train_batch_size, train_batch_size=train_batch_size,
                             epochs=epochs, micro_rollout_batch_size=micro_rollout_batch_size,
                             actor_learning_rate=actor_learning_rate, lr_scheduler=lr_scheduler,
                             lr_warmup_ratio=lr_warmup_ratio, min_lr_ratio=min_lr_ratio),
        "val_samples": val_samples,
        "val_temperature": val_temperature,
    }
