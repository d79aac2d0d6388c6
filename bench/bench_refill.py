"""Dynamic sampling, refill against masking, on the demo's task (``examples/grpo_demo.py``): GRPO on the
real SmolLM2-135M-Instruct, chat-rendered arithmetic, reward 1 for the right final number.

Both modes train from the same weights on the same prompt stream with the demo's settings (4 prompts x
8 samples per step, 24 new tokens, lr 2e-5, clip 0.2/0.28, token-level loss) for the same number of
steps; "mask" (LightRFT's) leaves the groups whose rewards all tie out of the loss, "refill" over-samples
and generates again (``max_num_gen_batches``, ``batch_multiplier``) until every step holds 4 groups with
signal. Printed per mode: the fraction of the step's groups with signal (each step), generation rounds
and prompts generated per step, steps/s over the steps after the first, and greedy accuracy on the
held-out problems after training (the same problems for both; the accuracy before training once).

    python bench/bench_refill.py [--steps 4] [--held-out 64] [--max-num-gen-batches 4] [--batch-multiplier 1.5]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightrft_lightning import LightRFTFake
from lightrft_lightning.algorithms import GRPO
from lightrft_lightning.data import PromptDataModule
from lightrft_lightning.tasks import arithmetic_splits

REWARD = "lightrft_lightning.tasks:arithmetic_reward"


class StepLog(Callback):
    """Each step's wall time and the metrics this bench reports."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.steps.append({"seconds": time.perf_counter() - self._start, "reward": m["reward"],
                           "signal": 1.0 - m["groups/all_tied"], "rounds": m.get("dynamic_sampling/rounds", 1.0),
                           "prompts": m.get("dynamic_sampling/prompts", float(len(batch["rows"])))})


def run(mode: str, args, train, held_out, precision: str) -> dict:
    pl.seed_everything(args.seed, verbose=False)
    refill = {"max_num_gen_batches": args.max_num_gen_batches, "batch_multiplier": args.batch_multiplier}
    model = GRPO(model="smollm2-135m-instruct", apply_chat_template=True, rewards={REWARD: 1.0},
                 n_samples_per_prompt=8, max_new_tokens=24, micro_train_batch_size=16, actor_learning_rate=args.lr,
                 clip_high=0.28, dynamic_sampling=True, dynamic_sampling_mode=mode,
                 **(refill if mode == "refill" else {}))
    data = PromptDataModule(prompts=train, val_prompts=held_out, batch_size=4, val_batch_size=64, seed=args.seed)
    log = StepLog()
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), precision=precision, max_steps=args.steps,
                         logger=False, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, callbacks=[log])
    before = None
    if args.before and mode == "mask":
        before = trainer.validate(model, data, verbose=False)[0]["val/accuracy"]
    start = time.perf_counter()
    trainer.fit(model, data)
    fit_s = time.perf_counter() - start
    evaluator = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), precision=precision, logger=False,
                           enable_progress_bar=False, enable_model_summary=False)
    after = evaluator.validate(model, data, verbose=False)[0]["val/accuracy"]
    warm = log.steps[1:] or log.steps
    return {"mode": mode, "steps": log.steps, "fit_s": fit_s, "before": before, "accuracy": after,
            "steps_per_s": len(warm) / sum(s["seconds"] for s in warm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--max-num-gen-batches", type=int, default=4)
    parser.add_argument("--batch-multiplier", type=float, default=1.5)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", action="store_true", help="also evaluate the untrained model")
    parser.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-mixed"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    precision = args.precision
    if precision == "auto":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        precision = "bf16-mixed" if native else "32-true"
    train, held_out = arithmetic_splits(train=4096, held_out=args.held_out, seed=args.seed)
    results = []
    for mode in ("mask", "refill"):
        results.append(run(mode, args, train, held_out, precision))
        print(f"{mode}: {json.dumps(results[-1])}", flush=True)  # each mode as soon as it is done
    print(f"GRPO on arithmetic, SmolLM2-135M-Instruct, {precision}, {args.threads} threads, {args.steps} steps of "
          f"4 prompts x 8 samples; refill: max_num_gen_batches={args.max_num_gen_batches}, "
          f"batch_multiplier={args.batch_multiplier}; {args.held_out} held-out problems (greedy)")
    if results[0]["before"] is not None:
        print(f"held-out accuracy before training: {results[0]['before']:.3f}")
    print(f"{'mode':<7} {'signal per step':<28} {'rounds per step':<18} {'prompts per step':<20} {'steps/s':>8} "
          f"{'fit s':>6} {'held-out acc':>12}")
    for r in results:
        signal = " ".join(f"{s['signal']:.2f}" for s in r["steps"])
        rounds = " ".join(f"{s['rounds']:.0f}" for s in r["steps"])
        prompts = " ".join(f"{s['prompts']:.0f}" for s in r["steps"])
        print(f"{r['mode']:<7} {signal:<28} {rounds:<18} {prompts:<20} {r['steps_per_s']:>8.4f} {r['fit_s']:>6.0f} "
              f"{r['accuracy']:>12.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
