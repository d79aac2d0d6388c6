"""Multi-turn GRPO on the built-in SmolLM2-135M-Instruct (CPU): arithmetic with a calculator tool
(``--task calculator``) or with feedback after a wrong answer and another try (``--task retry``).

Prints the held-out reward (greedy episodes) before and after the same number of steps, tool calls
and turns per episode, and the wall time. The YAML twins: examples/multiturn_{calculator,retry}_smollm2.yaml.

    python examples/multiturn_smollm2.py --task calculator [--steps 8] [--held-out 32]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import lightning.pytorch as pl
import torch

from lightrft_lightning import LightRFTFake
from lightrft_lightning.algorithms import Advantages, GRPOLoss, Policy, RLModule, Training
from lightrft_lightning.algorithms.episodes import MultiTurnRollout, episode_metrics
from lightrft_lightning.callbacks.rollout_engine import hf_model
from lightrft_lightning.data import PromptDataModule
from lightrft_lightning.engines.base import SamplingParams
from lightrft_lightning.engines.hf import HFEngine
from lightrft_lightning.tasks import arithmetic_splits

TASKS = {"calculator": ("lightrft_lightning.agent_tasks:CalculatorArithmetic", 3),
         "retry": ("lightrft_lightning.agent_tasks:RetryArithmetic", 3)}


def evaluate(module: RLModule, rows: list[dict]) -> dict[str, float]:
    """Greedy episodes on ``rows`` with the actor's current weights: mean reward, tool calls, turns."""
    tok = module.tokenizer
    engine = HFEngine(hf_model(module.actor), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    rollout = module.rollout
    _, episodes = rollout.run_episodes(engine.generate, rows, SamplingParams(n=1, temperature=0.0,
                                                                             max_new_tokens=rollout.max_new_tokens))
    rewards = torch.tensor([sum(ep.rewards) for ep in episodes])
    return episode_metrics(episodes, rewards, "held_out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="calculator")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/multiturn")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    environment, max_turns = TASKS[args.task]
    train, held_out = arithmetic_splits(train=512, held_out=args.held_out, seed=args.seed)
    rollout = MultiTurnRollout(environment, max_turns=max_turns, max_total_tokens=512, n_samples_per_prompt=4,
                               max_new_tokens=40, temperature=1.0, tool_timeout_s=5.0)
    module = RLModule(GRPOLoss(clip_high=0.28), Policy(model="smollm2-135m-instruct"), rollout,
                      Advantages(estimator="group_norm"),
                      Training(micro_train_batch_size=8, actor_learning_rate=args.lr))
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), max_steps=args.steps, logger=False,
                         num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, default_root_dir=args.out)
    before = evaluate(module, held_out)
    trainer.fit(module, PromptDataModule(prompts=train, batch_size=4, seed=args.seed))
    after = evaluate(module, held_out)
    wall = time.perf_counter() - start
    print(f"task {args.task}: held-out reward (greedy, {len(held_out)} problems) "
          f"{before['reward/env/held_out']:.3f} -> {after['reward/env/held_out']:.3f} after {args.steps} steps")
    for key in ("episode/tool_calls", "episode/tool_errors", "episode/turns"):
        print(f"  {key} per episode: {before[key]:.2f} -> {after[key]:.2f}")
    print(f"  wall {wall:.0f} s")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
