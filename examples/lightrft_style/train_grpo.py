"""GRPO written the LightRFT way, without Lightning's Trainer: LightRFT's argparse names, ``get_strategy(args)``,
then the strategy calls in the order LightRFT's ``examples/gsm8k_geo3k/train_colocate.py`` and its trainer
make them. Porting from LightRFT is the import line (``from lightrft_lightning import get_strategy`` for
``from lightrft.strategy import get_strategy``) plus ``strategy.setup_distributed()``, which LightRFT's
constructor calls itself.

The task: arithmetic questions (``lightrft_lightning.tasks.arithmetic_problems``) as chat prompts, scored
by ``arithmetic_reward`` (1 for the right number). The rollout engine is the built-in Hugging Face
engine (``--engine_type hf``); ``vllm`` and ``sglang`` work where those are installed.

    # one process (the fake strategy), the real model (SmolLM2-135M-Instruct, converted on first use)
    python examples/lightrft_style/train_grpo.py --strategy fake
    # 2 ranks on CPU (gloo): FSDP2, or DeepSpeed ZeRO-2
    torchrun --nproc_per_node=2 examples/lightrft_style/train_grpo.py --fsdp
    torchrun --nproc_per_node=2 examples/lightrft_style/train_grpo.py --zero_stage 2
    # a random-init tiny model with a character tokenizer, for a smoke test
    python examples/lightrft_style/train_grpo.py --strategy fake --pretrain tiny --generate_max_len 4

Rank 0 prints each step's mean reward and time, and at the end ``RESULT {json}`` (rewards, losses, times,
the checkpoint and the exported model directory).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Actor(nn.Module):
    """LightRFT's ``ActorLanguage``: a wrapper whose ``.model`` is the Hugging Face causal LM; its forward
    gives the log-probabilities of the last ``num_actions`` tokens of each sequence."""

    def __init__(self, pretrain: str, vocab_size: int = 0) -> None:
        super().__init__()
        if pretrain == "tiny":
            from lightrft_lightning.tiny_models import tiny_causal_lm

            self.model = tiny_causal_lm(seed=1, vocab_size=vocab_size)
        else:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(pretrain, dtype=torch.float32)

    def forward(self, sequences: torch.Tensor, num_actions: int, attention_mask: torch.Tensor) -> torch.Tensor:
        from lightrft_lightning.algorithms.log_probs import log_probs
        from lightrft_lightning.parallel import ulysses

        if ulysses.is_enabled(self.model):
            # sp_size > 1: each rank of the sequence-parallel group forwards its share of every sequence's
            # positions (as LightRFT's actor splits them with Ulysses); log_probs gathers the group's log-probs
            return log_probs(self.model, sequences, attention_mask.long())[0][:, -num_actions:]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # the logits of the positions that predict the actions only (the vocabulary is large)
        logits = self.model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
                            logits_to_keep=num_actions + 1).logits[:, :-1]
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, sequences[:, -num_actions:, None]).squeeze(-1)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # model and strategy (LightRFT's names; --strategy is lightrft-lightning's: fake, fsdp or deepspeed)
    p.add_argument("--pretrain", default="smollm2-135m-instruct",
                   help="a built-in name, a Hugging Face directory, or 'tiny' (random init, character tokenizer)")
    p.add_argument("--strategy", default=None, choices=["fake", "fsdp", "deepspeed"])
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--meta_init", action="store_true", help="build the models on the meta device, then load weights")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_norm", type=float, default=1.0)
    # batch sizes: rollout_batch_size prompts x n_samples_per_prompt samples per step; train_batch_size of
    # them make one optimizer step
    p.add_argument("--rollout_batch_size", type=int, default=4)
    p.add_argument("--micro_rollout_batch_size", type=int, default=2)
    p.add_argument("--n_samples_per_prompt", type=int, default=4)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--micro_train_batch_size", type=int, default=4)
    p.add_argument("--max_samples", type=int, default=64, help="number of prompts in the dataset")
    p.add_argument("--num_episodes", type=int, default=1)
    p.add_argument("--max_epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=3, help="stop after this many steps (lightrft-lightning's)")
    # generation
    p.add_argument("--generate_max_len", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--engine_type", default="hf", choices=["hf", "vllm", "sglang"])
    p.add_argument("--engine_tp_size", type=int, default=1)
    p.add_argument("--sp_size", type=int, default=1, help="ranks per sequence (Ulysses sequence parallelism)")
    p.add_argument("--enable_engine_sleep", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--apply_chat_template", action=argparse.BooleanOptionalAction, default=True)
    # optimization
    p.add_argument("--actor_learning_rate", type=float, default=1e-6)
    p.add_argument("--lr_warmup_ratio", type=float, default=0.0)
    p.add_argument("--l2", type=float, default=0.0)
    p.add_argument("--adam_betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--eps_clip", type=float, default=0.2)
    p.add_argument("--advantage_estimator", default="group_norm")
    p.add_argument("--reward_fn", default="lightrft_lightning.tasks:arithmetic_reward",
                   help="pkg.module:fn(prompts, completions, metadata) -> list of floats")
    p.add_argument("--init_kl_coef", type=float, default=0.0)
    p.add_argument("--kl_estimator", default="k3")
    # checkpoints and export
    p.add_argument("--save_path", default="outputs/lightrft_style_grpo/model")
    p.add_argument("--ckpt_path", default="outputs/lightrft_style_grpo/ckpt")
    p.add_argument("--max_ckpt_num", type=int, default=2)
    p.add_argument("--load_checkpoint", action="store_true")
    args = p.parse_args(argv)
    args.adam_betas = tuple(args.adam_betas)
    return args


def make_experience(strategy, actor, initial_model, tokenizer, rows, prompt_ids, args) -> dict[str, Any]:
    """Rollout (gather_and_generate on the engine), rewards, group-normalized advantages, old log-probs."""
    import importlib

    from lightrft_lightning.algorithms.advantages import compute_advantages, kl_penalty

    sampling = {"n": args.n_samples_per_prompt, "temperature": args.temperature, "top_p": args.top_p,
                "max_tokens": args.generate_max_len}  # vLLM's names, as LightRFT passes them
    outputs = strategy.gather_and_generate(sampling, all_prompt_token_ids=prompt_ids, all_prompts=None,
                                           all_images=None, sleep_engine=True)
    # sp_size > 1: the ranks of a sequence-parallel group train on their samples together (LightRFT's
    # experience maker); the identity otherwise
    outputs, rows = strategy.sp_data_processor.preprocess(outputs), strategy.sp_data_processor.preprocess(rows)
    completions = tokenizer.batch_decode([o.output_token_ids for o in outputs], skip_special_tokens=True)
    n = args.n_samples_per_prompt
    texts = [r["prompt"] for r in rows for _ in range(n)]
    module, _, name = args.reward_fn.partition(":")
    reward_fn = getattr(importlib.import_module(module), name)
    rewards = torch.tensor(reward_fn(texts, completions, [r for r in rows for _ in range(n)]), dtype=torch.float32)
    # sequences: left-padded prompts, right-padded completions (as LightRFT's experience maker builds them)
    pad = tokenizer.pad_token_id
    prompt_len = max(len(o.prompt_token_ids) for o in outputs)
    num_actions = max(max(len(o.output_token_ids) for o in outputs), 1)
    seqs = torch.full((len(outputs), prompt_len + num_actions), pad, dtype=torch.long)
    attention = torch.zeros_like(seqs, dtype=torch.bool)
    action_mask = torch.zeros(len(outputs), num_actions, dtype=torch.bool)
    for i, o in enumerate(outputs):
        p, c = list(o.prompt_token_ids), list(o.output_token_ids)
        seqs[i, prompt_len - len(p):prompt_len] = torch.tensor(p)
        seqs[i, prompt_len:prompt_len + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[i, prompt_len - len(p):prompt_len + len(c)] = True
        action_mask[i, :len(c)] = True
    with torch.no_grad():
        old_logp = torch.cat([actor(seqs[s:s + args.micro_train_batch_size], num_actions,
                                    attention[s:s + args.micro_train_batch_size])
                              for s in range(0, len(seqs), args.micro_train_batch_size)])
        kl = None
        if initial_model is not None:
            ref = torch.cat([initial_model(seqs[s:s + args.micro_train_batch_size], num_actions,
                                           attention[s:s + args.micro_train_batch_size])
                             for s in range(0, len(seqs), args.micro_train_batch_size)])
            kl = kl_penalty(old_logp, ref, args.kl_estimator) * action_mask
    advantages, _ = compute_advantages(args.advantage_estimator, rewards, action_mask, n)
    return {"sequences": seqs, "attention_mask": attention, "action_mask": action_mask, "old_logp": old_logp,
            "advantages": advantages, "rewards": rewards, "kl": kl, "num_actions": num_actions}


def train_step(strategy, actor, optimizer, scheduler, exp: dict[str, Any], args) -> float:
    """One optimizer step: the GRPO clipped objective over micro-batches, LightRFT's backward/optimizer_step."""
    total, count = 0.0, 0
    for s in range(0, len(exp["sequences"]), args.micro_train_batch_size):
        sl = slice(s, s + args.micro_train_batch_size)
        mask = exp["action_mask"][sl].float()
        logp = actor(exp["sequences"][sl], exp["num_actions"], exp["attention_mask"][sl])
        ratio = torch.exp(logp - exp["old_logp"][sl])
        adv = exp["advantages"][sl]
        surrogate = -torch.min(ratio * adv, ratio.clamp(1 - args.eps_clip, 1 + args.eps_clip) * adv)
        if exp["kl"] is not None:
            surrogate = surrogate + args.init_kl_coef * exp["kl"][sl]
        loss = ((surrogate * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        strategy.backward(loss, actor, optimizer)
        strategy.optimizer_step(optimizer, actor, scheduler, name="actor")
        total, count = total + loss.item(), count + 1
    return total / max(count, 1)


def train(args: argparse.Namespace) -> dict[str, Any]:
    from lightrft_lightning import get_strategy, pretrained
    from lightrft_lightning.data import render_prompts
    from lightrft_lightning.tasks import arithmetic_problems
    from lightrft_lightning.tokenizer import load_tokenizer

    start = time.perf_counter()
    # configure strategy (LightRFT's constructor joins the process group; ours is explicit)
    strategy = get_strategy(args)
    strategy.setup_distributed()
    ds_train_cfg = strategy.get_ds_train_config(is_actor=True) if not args.fsdp and args.strategy != "fake" else None
    tokenizer = load_tokenizer("char" if args.pretrain == "tiny" else args.pretrain)
    pretrain = args.pretrain if args.pretrain == "tiny" else pretrained.resolve(args.pretrain)  # the HF directory
    # configure models
    with strategy.init_model_context(meta_init=args.meta_init):
        strategy.print(f"Initializing models with meta_init={args.meta_init}")
        actor = Actor(pretrain, len(tokenizer))
    if args.fsdp:  # LightRFT's pre-prepare, to save memory
        setattr(actor, "is_actor", True)
        actor = strategy.prepare_model(actor, is_training=True)
    initial_model = None
    if args.init_kl_coef > 0:
        initial_model = Actor(pretrain, len(tokenizer))
        if args.fsdp:
            initial_model = strategy.prepare_model(initial_model, is_training=False)
            strategy.offload_model(initial_model)
    strategy.report_memory("after models init")
    # data: each rank gets rollout_batch_size // world_size prompts per step (with sp_size > 1, make_experience
    # gathers an sp group's samples: sp_data_processor.preprocess)
    rows = arithmetic_problems(args.max_samples, seed=args.seed)
    chat = args.apply_chat_template and args.pretrain != "tiny"
    texts, ids = render_prompts(rows, tokenizer, apply_chat_template=chat)
    dataset = [{**row, "text": text, "ids": tid} for row, text, tid in zip(rows, texts, ids)]
    prompts_dataloader = strategy.setup_dataloader(dataset, args.rollout_batch_size // strategy.world_size, True, True,
                                                   collate_fn=lambda batch: batch)
    num_update_steps_per_episodes = len(dataset) * args.n_samples_per_prompt // args.train_batch_size * args.max_epochs
    max_steps = math.ceil(args.num_episodes * num_update_steps_per_episodes)
    ((actor, actor_optim, actor_scheduler), _critic, _reward_models, initial_model) = \
        strategy.prepare_models_and_optimizers(actor, None, [], initial_model, args, max_steps)
    if args.meta_init and args.pretrain != "tiny":  # meta-initialized: the pretrained weights come in now
        strategy.load_model(actor, os.path.join(pretrain, "model.safetensors"))
    consumed_samples = 0
    actor_ckpt = os.path.join(args.ckpt_path, "_actor")
    if args.load_checkpoint and os.path.exists(actor_ckpt):
        _, states = strategy.load_ckpt(actor.model, actor_ckpt, optimizer=actor_optim, scheduler=actor_scheduler)
        consumed_samples = states["consumed_samples"]
        strategy.print(f"Loaded the checkpoint: {actor_ckpt}, consumed_samples: {consumed_samples}")
    os.makedirs(args.save_path, exist_ok=True)
    strategy.setup_inference_engine(args, engine_type=args.engine_type, actor=actor)
    strategy.report_memory("after setup_inference_engine")
    setup_s = time.perf_counter() - start

    # the trainer's loop: make experience, train, push weights
    rewards, losses, step_s = [], [], []
    for step, batch in enumerate(prompts_dataloader):
        if step >= args.max_steps:
            break
        t0 = time.perf_counter()
        exp = make_experience(strategy, actor, initial_model, tokenizer, batch, [r["ids"] for r in batch], args)
        loss = train_step(strategy, actor, actor_optim, actor_scheduler, exp, args)  # the engine sleeps meanwhile
        strategy.wakeup_inference_engine()  # LightRFT's update_engine_weights wakes the engine first
        strategy.update_engine_weights(actor)  # the new weights, gathered bucket by bucket
        strategy.maybe_sleep_inference_engine()  # until the next rollout's gather_and_generate wakes it
        consumed_samples += args.rollout_batch_size
        reward = strategy.all_reduce(exp["rewards"].mean().item())
        rewards.append(reward)
        losses.append(strategy.all_reduce(loss))
        step_s.append(time.perf_counter() - t0)
        strategy.print(f"step {step + 1}: reward {reward:.4f}  loss {losses[-1]:+.5f}  "
                       f"lr {actor_scheduler.get_last_lr()[0]:.2e}  {step_s[-1]:.1f}s")
    ckpt = strategy.save_ckpt(actor.model, actor_ckpt, max_num=args.max_ckpt_num,
                              client_state={"consumed_samples": consumed_samples})
    strategy.save_model(actor, tokenizer, args.save_path)
    wall = time.perf_counter() - start
    return {"strategy": type(strategy).__name__, "world_size": strategy.world_size, "rewards": rewards,
            "losses": losses, "step_s": step_s, "setup_s": setup_s, "wall_s": wall, "ckpt": ckpt,
            "save_path": args.save_path, "consumed_samples": consumed_samples,
            "accumulated_gradient": strategy.accumulated_gradient, "ds_train_cfg": ds_train_cfg is not None,
            "attention": strategy.unwrap_model(actor).model.config._attn_implementation}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = train(parse_args(argv))
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main()
