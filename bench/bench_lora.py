"""LoRA against full fine-tuning: GRPO on the real model (SmolLM2-135M-Instruct), in one run.

Per setting: seconds per GRPO step after the first (warm-up) step, the training memory of one rank
in bytes (parameters + gradients + optimizer state + the KL reference's weights, counted from the
tensors after training), the size of a Lightning checkpoint, and, for LoRA, how many held-out
prompts the rollout engine completes greedily exactly as peft's merge of the trained actor does.

Usage: python bench/bench_lora.py [--steps 4] [--prompts 4] [--n 4] [--tokens 16] [--r 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightrft_lightning import LightRFTFake
from lightrft_lightning.algorithms import GRPO
from lightrft_lightning.callbacks import RolloutEngineCallback
from lightrft_lightning.data import PromptDataModule, render_prompts
from lightrft_lightning.engines.base import SamplingParams
from lightrft_lightning.lora import lora_layers
from lightrft_lightning.tasks import arithmetic_problems

MODEL = "smollm2-135m-instruct"


class Clock(Callback):
    """Step ends; at the end of training (the engine still up), the greedy check of a LoRA actor."""

    def __init__(self, args) -> None:
        self.args = args
        self.ends: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.matched: tuple[int, int] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.ends.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        m = trainer.callback_metrics
        self.phases.append({"sync": float(m["rollout/sync_s"]), "generate": float(m["rollout/generate_s"]),
                            "score": float(m["time/score"]), "train": float(m["time/train"]),
                            "tokens": float(m["response_length"])})

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.lora is not None:
            self.matched = greedy_matches(trainer, pl_module, self.args)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run(args, lora: dict | None) -> dict:
    pl.seed_everything(0, verbose=False)
    module = GRPO(model=MODEL, apply_chat_template=True, rewards={"lightrft_lightning.tasks:arithmetic_reward": 1.0},
                  n_samples_per_prompt=args.n, max_new_tokens=args.tokens, temperature=1.0,
                  micro_train_batch_size=args.prompts * args.n, actor_learning_rate=args.lr, kl_coef=0.01, lora=lora)
    clock = Clock(args)
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock])
    trainer.fit(module, PromptDataModule(prompts=arithmetic_problems(args.prompts * args.steps, seed=0),
                                         batch_size=args.prompts, shuffle=False))
    actor = module.actor
    trainable = [p for p in actor.parameters() if p.requires_grad]
    optimizer_state = [t for s in trainer.optimizers[0].state.values() for t in s.values()
                       if isinstance(t, torch.Tensor) and t.dim() > 0]
    memory = {"parameters": nbytes(actor.parameters()), "gradients": nbytes(trainable),
              "optimizer": nbytes(optimizer_state), "reference": nbytes(module.ref.parameters()) if module.ref else 0}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "last.ckpt")
        trainer.save_checkpoint(path)
        ckpt_bytes = os.path.getsize(path)
    step_s = [b - a for a, b in zip(clock.ends, clock.ends[1:])][1:]
    phases = {k: sum(p[k] for p in clock.phases[1:]) / len(step_s) for k in clock.phases[0]}
    result = {"step_s": sum(step_s) / len(step_s), "phases": phases, "memory": memory, "ckpt_bytes": ckpt_bytes,
              "trainable": sum(p.numel() for p in trainable)}
    if lora is not None:
        result["greedy_matched"] = clock.matched
    return result


def greedy_matches(trainer: pl.Trainer, module: GRPO, args) -> tuple[int, int]:
    """Held-out prompts whose greedy completion by the engine (after a push of the trained actor)
    equals the one of peft's in-place merge applied to a copy of the actor."""
    _, prompts = render_prompts(arithmetic_problems(8, seed=99), module.tokenizer, True)
    callback = next(cb for cb in trainer.callbacks if isinstance(cb, RolloutEngineCallback))
    completions = callback.generate(module, prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=args.tokens))
    merged = copy.deepcopy(module.actor).eval()
    for _, layer in lora_layers(merged):
        layer.merge()
    eos, same = module.tokenizer.eos_token_id, 0
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([prompt])
        out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=args.tokens, pad_token_id=module.tokenizer.pad_token_id,
                              eos_token_id=eos)[0, ids.shape[1]:].tolist()
        same += (out[: out.index(eos) + 1] if eos in out else out) == list(completion.token_ids)
    return same, len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    full = run(args, None)
    lora = run(args, {"r": args.r, "alpha": 2 * args.r})
    mib = 2**20
    print(f"\n{MODEL}, GRPO with a KL reference, {args.prompts} prompts x {args.n} samples x {args.tokens} new tokens, "
          f"LoRA r={args.r} on the attention and MLP projections, fp32, {args.threads} threads, LightRFTFake\n")
    print("| | trainable params | params MiB | grads MiB | optimizer MiB | reference MiB | total MiB | checkpoint MiB "
          "| s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in (("full", full), ("LoRA", lora)):
        m = r["memory"]
        print(f"| {name} | {r['trainable'] / 1e6:.2f}M | " + " | ".join(f"{m[k] / mib:.0f}" for k in m)
              + f" | {sum(m.values()) / mib:.0f} | {r['ckpt_bytes'] / mib:.1f} | {r['step_s']:.2f} |")
    total = {k: sum(r["memory"].values()) for k, r in (("full", full), ("lora", lora))}
    print(f"| LoRA / full | | | | | | **{total['lora'] / total['full']:.3f}** | "
          f"**{lora['ckpt_bytes'] / full['ckpt_bytes']:.4f}** | **{lora['step_s'] / full['step_s']:.2f}** |")
    print("\nmean seconds per phase over steps 2..: " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items() if k != "tokens")
        + f" (mean response {r['phases']['tokens']:.1f} tokens)" for name, r in (("full", full), ("LoRA", lora))))
    same, count = lora["greedy_matched"]
    print(f"\ngreedy completions after the last sync, engine vs merged actor: {same}/{count} prompts equal")


if __name__ == "__main__":
    main()
