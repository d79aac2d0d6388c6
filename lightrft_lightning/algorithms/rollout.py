"""`Rollout`: prompt rows in, scored :class:`Experience` out (render, generate, pack, reward).

The learner does not know how its experience was made: a rollout is handed to the module, and another
source (a server engine, an asynchronous producer, a multi-turn agent loop) is another `Rollout`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightrft_lightning.algorithms.experience import Experience
from lightrft_lightning.algorithms.rewards import CombinedReward
from lightrft_lightning.data import render_prompts
from lightrft_lightning.engines.base import Completion, SamplingParams

DEFAULT_REWARDS = {"lightrft_lightning.tasks:counting_reward": 1.0}


class Rollout:
    """Synchronous single-turn rollouts through the Trainer's rollout-engine callback.

    Args:
        rewards: ``{"package.module:function" or reward-model directory: weight}``.
        n_samples_per_prompt: completions sampled per prompt.
        max_new_tokens, temperature, top_p: sampling.
        apply_chat_template: render ``prompt`` rows as a user message with the tokenizer's chat template
            (``messages`` rows always are; see :func:`~lightrft_lightning.data.render_prompts`).
        sample_every_n_steps: every this many steps write a few prompts and completions to
            ``<log_dir>/samples.jsonl`` and to loggers that take text; 0: never.
    """

    def __init__(self, rewards: Optional[dict[str, float]] = None, n_samples_per_prompt: int = 8,
                 max_new_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                 apply_chat_template: bool = False, sample_every_n_steps: int = 0) -> None:
        self.rewards = DEFAULT_REWARDS if rewards is None else rewards
        self.n_samples_per_prompt, self.max_new_tokens = n_samples_per_prompt, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.apply_chat_template, self.sample_every_n_steps = apply_chat_template, sample_every_n_steps
        self.tokenizer: Any = None
        self.reward_fn: Optional[CombinedReward] = None

    def check(self, owner: str) -> None:
        """Raise on a bad field, naming it as ``owner.field``."""
        for name in ("n_samples_per_prompt", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}.{name}={value!r} is invalid; accepted: an integer >= 1")
        value = self.temperature
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"{owner}.temperature={value!r} is invalid; accepted: a number >= 0 (finite)")
        value = self.sample_every_n_steps
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{owner}.sample_every_n_steps={value!r} is invalid; accepted: an integer >= 0")
        if not isinstance(self.apply_chat_template, bool):
            raise ValueError(f"{owner}.apply_chat_template={self.apply_chat_template!r} is invalid; accepted: True or "
                             "False")
        self.sampling_params()

    def bind(self, tokenizer: Any) -> None:
        """Take the policy's tokenizer and build the reward functions (after the policy: same RNG order)."""
        self.tokenizer = tokenizer
        self.reward_fn = CombinedReward(self.rewards)

    def modules(self) -> dict[str, nn.Module]:
        """The modules the rollout runs (reward models): the learner makes them its children, so that
        Lightning and the strategy place, wrap and checkpoint them with the others."""
        return {"reward_fn": self.reward_fn}

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(n=self.n_samples_per_prompt, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens)

    def render(self, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[int]]]:
        """The prompt texts and their token ids."""
        return render_prompts(rows, self.tokenizer, self.apply_chat_template)

    @torch.no_grad()
    def __call__(self, module: pl.LightningModule, rows: list[dict[str, Any]]) -> tuple[Experience, dict[str, float]]:
        """Generate ``n_samples_per_prompt`` completions per row with the actor's current weights and score
        them: an :class:`Experience` with ``rewards`` (on the module's device), and rollout metrics."""
        from lightrft_lightning.callbacks import find_rollout_callback

        prompts, prompt_ids = self.render(rows)
        t0 = time.perf_counter()
        completions = find_rollout_callback(module.trainer).generate(module, prompt_ids, self.sampling_params())
        return self.score(module, rows, prompts, prompt_ids, completions, time.perf_counter() - t0)

    def score(self, module: pl.LightningModule, rows: list[dict[str, Any]], prompts: list[str],
              prompt_ids: list[list[int]], completions: list[Completion],
              generate_s: float) -> tuple[Experience, dict[str, float]]:
        """Pack and score ``completions`` of ``rows`` (rendered as ``prompts`` / ``prompt_ids``): the
        :class:`Experience` with ``rewards`` on the module's device, and rollout metrics."""
        n = self.n_samples_per_prompt
        t1 = time.perf_counter()
        if len(completions) != len(prompts) * n:
            raise RuntimeError(f"the rollout engine returned {len(completions)} completions for {len(prompts)} "
                               f"prompts x n={n}")
        exp = Experience(*(t.to(module.device) for t in self._pack(prompt_ids, completions)))
        exp.rollout_logp = engine_log_probs(completions, exp.action_mask)
        meta = [row_metadata(rows[c.prompt_index]) for c in completions]
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        sample_prompts = [prompts[c.prompt_index] for c in completions]
        scores = self.reward_fn.scores(sample_prompts, texts, meta)
        rewards = self.reward_fn.combine(scores)
        metrics = {"time/generate": generate_s, "time/score": time.perf_counter() - t1,
                   **self._metrics(scores, rewards, completions)}
        self._write_samples(module.trainer, sample_prompts, texts, rewards)
        exp.rewards = rewards.to(module.device)
        return exp, metrics

    @property
    def off_policy(self) -> bool:
        """Whether the samples may come from weights older than the ones trained (asynchronous)."""
        return False

    def callbacks(self) -> list[pl.Callback]:
        """Callbacks the rollout needs in the Trainer (the learner adds them)."""
        return []

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
        return ids, attn, action

    def _metrics(self, scores: dict[str, Tensor], rewards: Tensor, completions: list[Completion]) -> dict[str, float]:
        """Each reward's mean, the fraction of prompts whose samples all score the same (no learning
        signal under group baselines) and the fraction of completions cut at ``max_new_tokens``."""
        names = self.reward_fn.short_names()
        metrics = {f"reward/{names[name]}": float(values.mean()) for name, values in scores.items()}
        groups = rewards.view(-1, self.n_samples_per_prompt)
        metrics["groups/all_tied"] = float((groups == groups[:, :1]).all(dim=1).float().mean())
        metrics["response/truncated"] = sum(c.finish_reason == "length" for c in completions) / len(completions)
        return metrics

    def _write_samples(self, trainer: pl.Trainer, prompts: list[str], completions: list[str], rewards: Tensor,
                       keep: int = 4) -> None:
        """Every ``sample_every_n_steps`` steps: ``keep`` samples to ``<log_dir>/samples.jsonl`` (rank 0)
        and to loggers with ``log_text``."""
        every = self.sample_every_n_steps
        if not every or trainer.global_step % every or not trainer.is_global_zero:
            return
        rows = [{"step": trainer.global_step, "prompt": p, "completion": c, "reward": float(r)}
                for p, c, r in list(zip(prompts, completions, rewards))[:keep]]
        log_dir = trainer.log_dir or trainer.default_root_dir
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "samples.jsonl"), "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        for logger in trainer.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(key="samples", columns=list(rows[0]), data=[list(r.values()) for r in rows],
                                step=trainer.global_step)


def engine_log_probs(completions: list[Completion], action_mask: Tensor) -> Optional[Tensor]:
    """The engine's log-probs of the sampled tokens on ``action_mask``'s positions (``[N, L-1]``, 0
    elsewhere), or None when a completion came without them."""
    if any(len(c.logprobs) != len(c.token_ids) for c in completions):
        return None
    values = torch.tensor([lp for c in completions for lp in c.logprobs], dtype=torch.float32)
    out = torch.zeros(action_mask.shape, dtype=torch.float32, device=action_mask.device)
    return out.masked_scatter(action_mask.bool(), values.to(action_mask.device))


def row_metadata(row: dict[str, Any]) -> dict[str, Any]:
    """What a reward function gets besides the prompt and the completion: the row's other fields."""
    return {k: v for k, v in row.items() if k not in ("prompt", "messages")}
