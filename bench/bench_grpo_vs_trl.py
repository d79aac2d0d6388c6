"""Our GRPO (Trainer + LightRFTFake + HF rollout engine) against TRL's ``GRPOTrainer`` on CPU.

Same tiny random-init Qwen2 (same seed), character tokenizer, counting task and reward, group size,
prompts per step, completion length, learning rate (constant), clipping (0.2 / 0.28), grad-norm
clip 1.0 and no KL. Prints steps/s (training loop only, setup excluded) and the mean reward of the
last 10 steps for both, and their ratios. TRL is an optional dependency of this script only
(``pip install trl``).

Usage: python bench/bench_grpo_vs_trl.py [--steps 60] [--prompts 16] [--n 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
import warnings

MODEL_CONFIG = {"hidden_size": 64, "intermediate_size": 128}
CHARS = "0123456789"


def ours(args) -> tuple[float, list[float]]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from lightrft_lightning import LightRFTFake
    from lightrft_lightning.algorithms import GRPO
    from lightrft_lightning.data import PromptDataModule
    from lightrft_lightning.tasks import counting_prompts

    class Clock(Callback):
        rewards: list[float] = []

        def on_train_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rewards.append(float(trainer.callback_metrics["reward"]))
            self.end = time.perf_counter()

    pl.seed_everything(args.seed, verbose=False)
    model = GRPO(tokenizer_chars=CHARS, model_config=MODEL_CONFIG, n_samples_per_prompt=args.n,
                 max_new_tokens=args.completion_len, micro_train_batch_size=args.prompts * args.n,
                 actor_learning_rate=args.lr, clip_low=0.2, clip_high=0.28)
    data = PromptDataModule(prompts=counting_prompts(args.prompts * args.steps, seed=args.seed),
                            batch_size=args.prompts, shuffle=False)
    clock = Clock()
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[clock])
    trainer.fit(model, data)
    return args.steps / (clock.end - clock.start), clock.rewards


def trl(args) -> tuple[float, list[float]]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lightrft_lightning.tasks import counting_prompts, counting_reward
    from lightrft_lightning.tiny_models import tiny_causal_lm
    from lightrft_lightning.tokenizer import char_tokenizer

    tok = char_tokenizer(CHARS)
    model = tiny_causal_lm(seed=args.seed, vocab_size=len(tok), **MODEL_CONFIG)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    rows = counting_prompts(args.prompts * args.steps, seed=args.seed)

    def reward(prompts, completions, answer, **kwargs):
        return counting_reward(prompts, completions, [{"answer": a} for a in answer])

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.end = time.perf_counter()

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, use_cpu=True, report_to=[], max_steps=args.steps, logging_steps=1,
                            per_device_train_batch_size=args.prompts * args.n, num_generations=args.n,
                            max_completion_length=args.completion_len, learning_rate=args.lr,
                            lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, beta=0.0,
                            epsilon=0.2, epsilon_high=0.28, max_grad_norm=1.0, temperature=1.0,
                            save_strategy="no", seed=args.seed, shuffle_dataset=False, disable_tqdm=True,
                            dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
                              processing_class=tok, callbacks=[clock])
        trainer.train()
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return args.steps / (clock.end - clock.start), rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--completion-len", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("this benchmark needs TRL: pip install trl")
    results = {"ours (GRPO + LightRFTFake)": ours(args), "TRL GRPOTrainer": trl(args)}
    print(f"\n{args.steps} steps x {args.prompts} prompts x {args.n} samples, {args.completion_len} new tokens, "
          f"tiny Qwen2 {MODEL_CONFIG}, {args.threads} CPU threads")
    print(f"{'':28s} {'steps/s':>9s} {'reward (last 10)':>17s} {'reward (first 10)':>18s}")
    for name, (rate, rewards) in results.items():
        print(f"{name:28s} {rate:9.2f} {sum(rewards[-10:]) / 10:17.3f} {sum(rewards[:10]) / 10:18.3f}")
    (ours_rate, ours_r), (trl_rate, trl_r) = results.values()
    print(f"ratio ours/TRL: steps/s {ours_rate / trl_rate:.2f}x, reward (last 10) "
          f"{(sum(ours_r[-10:]) / 10) / max(sum(trl_r[-10:]) / 10, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
