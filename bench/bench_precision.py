"""bf16-mixed against fp32: GRPO step time on the real model (SmolLM2-135M-Instruct), same run.

Measures, in one process, the CPU's matmul rate in fp32 and bf16 (square matmuls), then runs the same
GRPO steps (LightRFTFake, chat-rendered arithmetic prompts, same seed) under ``precision="32-true"``
and ``precision="bf16-mixed"`` (fp32 master weights, bf16 autocast, bf16 rollout engine), and prints
per-phase seconds (generate, score, train) of the steps after the first, and the ratios. Whether
bf16 pays depends on the CPU: it needs AVX512-BF16 or AMX; on AVX2-only CPUs torch's bf16 matmul is
emulated and far slower than fp32.

Usage: python bench/bench_precision.py [--steps 3] [--prompts 2] [--n 2] [--tokens 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def matmul_gflops(dtype: torch.dtype, size: int, seconds: float = 1.0) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def grpo_phases(precision: str, args) -> dict[str, float]:
    """Mean seconds per phase over the steps after the first."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from lightrft_lightning import LightRFTFake
    from lightrft_lightning.algorithms import GRPO
    from lightrft_lightning.data import PromptDataModule
    from lightrft_lightning.tasks import arithmetic_problems

    class Phases(Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self.start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            m = trainer.callback_metrics
            self.steps.append({"step": time.perf_counter() - self.start, "reward": float(m["reward"]),
                               **{k[5:]: float(m[k]) for k in ("time/generate", "time/score", "time/train")}})

    pl.seed_everything(0, verbose=False)
    model = GRPO(model="smollm2-135m-instruct", apply_chat_template=True,
                 rewards={"lightrft_lightning.tasks:arithmetic_reward": 1.0}, n_samples_per_prompt=args.n,
                 max_new_tokens=args.tokens, micro_train_batch_size=args.prompts * args.n, actor_learning_rate=1e-5)
    data = PromptDataModule(prompts=arithmetic_problems(args.prompts * args.steps, seed=0), batch_size=args.prompts,
                            shuffle=False)
    phases = Phases()
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), precision=precision, max_steps=args.steps,
                         logger=False, callbacks=[phases], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, data)
    timed = phases.steps[1:] or phases.steps
    return {k: sum(s[k] for s in timed) / len(timed) for k in timed[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--matmul", type=int, default=1024)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    bf16_isa = [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]
    rates = {name: matmul_gflops(dtype, args.matmul) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    runs = {p: grpo_phases(p, args) for p in ("32-true", "bf16-mixed")}
    print(f"\nCPU bf16 instructions: {', '.join(bf16_isa) or 'none (AVX2 only: bf16 is emulated)'}; "
          f"{args.threads} threads; {args.prompts} prompts x {args.n} samples x {args.tokens} new tokens")
    print(f"matmul {args.matmul}^3: fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.1f} GFLOP/s, "
          f"bf16/fp32 {rates['bf16'] / rates['fp32']:.3f}\n")
    keys = ("step", "generate", "score", "train", "reward")
    print(f"| precision | {' | '.join(k + (' s' if k != 'reward' else '') for k in keys)} |")
    print("|---" * (len(keys) + 1) + "|")
    for precision, run in runs.items():
        print(f"| {precision} | {' | '.join(f'{run[k]:.3f}' for k in keys)} |")
    fp32, bf16 = runs["32-true"], runs["bf16-mixed"]
    print(f"| bf16 / fp32 time | {' | '.join(f'{bf16[k] / fp32[k]:.2f}' for k in keys[:-1])} | |")


if __name__ == "__main__":
    main()
