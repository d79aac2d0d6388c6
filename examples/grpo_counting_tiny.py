"""GRPO on CPU teaches a random-init tiny Qwen2 to continue counting ("345" -> "6789").

Prints the mean reward at the start and the end (sampled completions during training, and greedy
completions on all 30 distinct prompts before and after), the wall time, and writes the CSV log and a
reward-curve PNG under ``--out`` (default ``outputs/grpo_counting_tiny``).

    python examples/grpo_counting_tiny.py [--steps 200] [--out outputs/grpo_counting_tiny]
"""

from __future__ import annotations

import argparse
import csv
import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny matmuls: more threads only spin

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import RichProgressBar  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from lightrft_lightning import LightRFTFake  # noqa: E402
from lightrft_lightning.algorithms import GRPO  # noqa: E402
from lightrft_lightning.data import PromptDataModule  # noqa: E402
from lightrft_lightning.tasks import all_counting_prompts, counting_prompts  # noqa: E402


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    rewards = [float(r["reward"]) for r in rows]
    window = 10
    smooth = [sum(rewards[max(0, i - window + 1): i + 1]) / len(rewards[max(0, i - window + 1): i + 1])
              for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, rewards, alpha=0.35, label="mean reward per step")
    ax.plot(steps, smooth, label=f"{window}-step average")
    ax.set(xlabel="step", ylabel="reward", title="GRPO on the counting task (tiny Qwen2, CPU)", ylim=(0, 1))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="outputs/grpo_counting_tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    start = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)

    model = GRPO(tokenizer_chars="0123456789", model_config={"hidden_size": 64, "intermediate_size": 128},
                 rewards={"lightrft_lightning.tasks:counting_reward": 1.0}, n_samples_per_prompt=8,
                 max_new_tokens=4, micro_train_batch_size=128, actor_learning_rate=1e-3, clip_high=0.28)
    # one epoch (512 steps) is longer than the run: no validation inside fit, only before and after
    data = PromptDataModule(prompts=counting_prompts(8192, seed=args.seed), val_prompts=all_counting_prompts(),
                            batch_size=16, seed=args.seed)
    logger = CSVLogger(args.out, name="", version="")
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), max_steps=args.steps, logger=logger,
                         log_every_n_steps=1, num_sanity_val_steps=0,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[RichProgressBar()])
    greedy_start = trainer.validate(model, data, verbose=False)[0]["val/reward"]
    trainer.fit(model, data)
    greedy_end = trainer.validate(model, data, verbose=False)[0]["val/reward"]
    wall = time.perf_counter() - start

    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("reward")]
    plot(rows, os.path.join(args.out, "reward_curve.png"))
    first, last = [float(r["reward"]) for r in rows[:10]], [float(r["reward"]) for r in rows[-10:]]
    print(f"\nGRPO on the counting task, {args.steps} steps x 16 prompts x 8 samples, tiny Qwen2 (random init), CPU")
    print(f"mean reward, sampled (first 10 steps -> last 10 steps): {sum(first) / 10:.3f} -> {sum(last) / 10:.3f}")
    print(f"mean reward, greedy on all 30 prompts (before -> after): {greedy_start:.3f} -> {greedy_end:.3f}")
    print(f"wall time: {wall:.1f} s")
    print(f"CSV log: {os.path.join(logger.log_dir, 'metrics.csv')}   reward curve: {os.path.join(args.out, 'reward_curve.png')}")


if __name__ == "__main__":
    main()
