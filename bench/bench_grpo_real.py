"""Our GRPO against TRL's ``GRPOTrainer`` on the real model (SmolLM2-135M-Instruct), in one run.

Both train the same model on the same chat-rendered arithmetic prompts (in the same order) with the
same group size, prompts per step, completion length, sampling temperature, learning rate (constant,
AdamW betas 0.9/0.95), clipping (0.2 / 0.28), grad-norm clip 1.0, token-level loss aggregation
(TRL's ``loss_type="dapo"``), group-normalized advantages and no KL term; one optimizer step per
rollout. Each framework runs in its own subprocess (one after the other) so that peak memory (max RSS)
is its own. Printed: steps/s after the first (warm-up) step, the reward of every step, our per-phase
seconds (generate, score, train, weight sync), peak memory, and our training phase against this CPU's
FLOP limit: FLOPs from the step's token counts (forward+backward = 6 x trained tokens x parameters)
over the fastest matmul rate measured by this script (fp32 and bf16, the same threads), for the
step's tokens and for the token positions our training forwards ran (the groups whose rewards all tie
have advantage 0 and no gradient: ours does not forward them; TRL does). Then the tiny
random-init model (``bench_grpo_vs_trl.py``'s setting) so both regimes stay visible.

Each at its best setting on this CPU: fp32 (no bf16 instructions: bf16 matmuls are ~100x slower),
no gradient checkpointing (TRL defaults to bf16 and checkpointing; both are turned off), and our
generator chosen with ``--engine``: the built-in HF engine, or real vLLM (its CPU build; run from the
vLLM venv) at its default, compiled with inductor (about 90 s more start-up than ``enforce_eager`` here,
inside the untimed first step, and 15-20% faster rollouts). TRL generates with ``transformers`` (its
vLLM modes need CUDA).

TRL is an optional dependency of this script only (``pip install trl``; 1.16 here).

Usage: python bench/bench_grpo_real.py [--steps 6] [--prompts 4] [--n 4] [--tokens 32] [--threads 2]
       VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 .venv-vllm/bin/python bench/bench_grpo_real.py --engine vllm
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

MODEL = "smollm2-135m-instruct"


def rows(args) -> list[dict]:
    from lightrft_lightning.tasks import arithmetic_problems

    return arithmetic_problems(args.prompts * args.steps, seed=args.seed)


def matmul_tflops(dtype_name: str, size: int = 1024, seconds: float = 1.0) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e12


def ours(args) -> dict:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightrft_lightning import LightRFTFake
    from lightrft_lightning.algorithms import GRPO
    from lightrft_lightning.callbacks import RolloutEngineCallback
    from lightrft_lightning.data import PromptDataModule

    class Clock(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.steps: list[dict[str, float]] = []
            self.forwarded = 0  # token positions of this step's training forwards (padding included)

        def on_train_start(self, trainer, pl_module) -> None:
            pl_module.actor.register_forward_pre_hook(self.count, with_kwargs=True)
            self.ends.append(time.perf_counter())

        def count(self, module, args, kwargs) -> None:
            if torch.is_grad_enabled():
                self.forwarded += kwargs["input_ids"].numel()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(time.perf_counter())
            m = trainer.callback_metrics
            self.steps.append({"reward": float(m["reward"]), "generate": float(m["rollout/generate_s"]),
                               "sync": float(m["rollout/sync_s"]), "score": float(m["time/score"]),
                               "train": float(m["time/train"]), "response_length": float(m["response_length"]),
                               "all_tied": float(m["groups/all_tied"]), "forwarded": self.forwarded})
            self.forwarded = 0

    pl.seed_everything(args.seed, verbose=False)
    model = GRPO(model=MODEL, apply_chat_template=True, rewards={"lightrft_lightning.tasks:arithmetic_reward": 1.0},
                 n_samples_per_prompt=args.n, max_new_tokens=args.tokens, temperature=1.0,
                 micro_train_batch_size=args.prompts * args.n, actor_learning_rate=args.lr, clip_low=0.2,
                 clip_high=0.28, loss_agg="token", advantage_estimator="group_norm", kl_coef=0.0)
    data = PromptDataModule(prompts=rows(args), batch_size=args.prompts, shuffle=False)
    clock = Clock()
    engine = RolloutEngineCallback(pad_token_id=model.tokenizer.pad_token_id, eos_token_id=model.tokenizer.eos_token_id,
                                   engine_kwargs={"max_model_len": 1024} if args.engine == "vllm" else None)
    strategy = LightRFTFake({"bf16": False, "max_norm": 1.0, "engine_type": args.engine})
    trainer = pl.Trainer(accelerator="cpu", strategy=strategy, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock, engine])
    trainer.fit(model, data)
    return {"step_s": [b - a for a, b in zip(clock.ends, clock.ends[1:])], "steps": clock.steps,
            "params": sum(p.numel() for p in model.actor.parameters()), "prompt_tokens": _prompt_tokens(model, args)}


def _prompt_tokens(model, args) -> float:
    """The mean length of a chat-rendered prompt."""
    from lightrft_lightning.data import render_prompts

    _, ids = render_prompts(rows(args), model.tokenizer, True)
    return sum(len(i) for i in ids) / len(ids)


def trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lightrft_lightning import pretrained
    from lightrft_lightning.tasks import arithmetic_reward

    path = pretrained.resolve(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows(args)]

    def reward(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return arithmetic_reward(prompts, texts, [{"answer": a} for a in answer])

    class Clock(TrainerCallback):
        ends: list[float] = []

        def on_train_begin(self, *a, **k):
            self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, use_cpu=True, report_to=[], max_steps=args.steps, logging_steps=1,
                            per_device_train_batch_size=args.prompts * args.n, num_generations=args.n,
                            max_completion_length=args.tokens, learning_rate=args.lr, lr_scheduler_type="constant",
                            warmup_steps=0, adam_beta2=0.95, beta=0.0, epsilon=0.2, epsilon_high=0.28,
                            loss_type="dapo", max_grad_norm=1.0, temperature=1.0, save_strategy="no", seed=args.seed,
                            shuffle_dataset=False, disable_tqdm=True, dataloader_num_workers=0,
                            # TRL's defaults are bf16=True and gradient_checkpointing=True: on this AVX2-only
                            # CPU bf16 matmuls run ~100x slower than fp32, and recomputation only costs time
                            bf16=False, gradient_checkpointing=False)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(data),
                              processing_class=tok, callbacks=[clock])
        trainer.train()
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"step_s": [b - a for a, b in zip(clock.ends, clock.ends[1:])], "steps": [{"reward": r} for r in rewards]}


def worker(args) -> None:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    result = {"ours": ours, "trl": trl}[args.worker](args)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.worker == "ours":
        result["matmul_tflops"] = {d: matmul_tflops(d) for d in ("float32", "bfloat16")}
    print("RESULT " + json.dumps(result))


def run_worker(name: str, args) -> dict:
    argv = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="our rollout engine")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny-model comparison")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit("this benchmark needs TRL: pip install trl")
    o, t = run_worker("ours", args), run_worker("trl", args)
    o_rate, t_rate = (len(r["step_s"][1:]) / sum(r["step_s"][1:]) for r in (o, t))
    print(f"\nreal model {MODEL} ({o['params'] / 1e6:.1f}M parameters, tied), fp32 (this CPU has no bf16 "
          f"instructions), {args.steps} steps x {args.prompts} prompts x {args.n} samples x {args.tokens} new tokens, "
          f"lr {args.lr}, {args.threads} threads; steps/s over steps 2..{args.steps}\n")
    print("| | steps/s | peak RSS GiB | reward per step |")
    print("|---|---|---|---|")
    for name, r, rate in ((f"ours (GRPO + LightRFTFake, {args.engine} engine)", o, o_rate), ("TRL GRPOTrainer", t, t_rate)):
        rewards = " ".join(f"{step['reward']:.3f}" for step in r["steps"])
        print(f"| {name} | {rate:.3f} | {r['peak_rss_gib']:.2f} | {rewards} |")
    print(f"| ours / TRL | **{o_rate / t_rate:.2f}** | {o['peak_rss_gib'] / t['peak_rss_gib']:.2f} | mean "
          f"{sum(s['reward'] for s in o['steps']) / len(o['steps']):.3f} vs "
          f"{sum(s['reward'] for s in t['steps']) / len(t['steps']):.3f} |")
    timed = o["steps"][1:]
    phases = {k: sum(s[k] for s in timed) / len(timed) for k in ("generate", "sync", "score", "train")}
    print("\nour step, mean seconds per phase over steps 2..: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
          + f" (step {sum(o['step_s'][1:]) / len(o['step_s'][1:]):.2f})")
    response = sum(s["response_length"] for s in timed) / len(timed)
    tied = sum(s["all_tied"] for s in timed) / len(timed)
    forwarded = sum(s["forwarded"] for s in timed) / len(timed)
    # every sample of the step with each prompt once per group (shared-prompt packing), and with a prompt
    # per sample (what TRL forwards); ours skips the groups whose rewards all tie (advantage 0: no gradient)
    step_tokens = (o["prompt_tokens"] + response * args.n) * args.prompts
    unshared = (o["prompt_tokens"] + response) * args.prompts * args.n
    best = max(o["matmul_tflops"].values())
    rates = ", ".join(f"{k} {v:.3f}" for k, v in o["matmul_tflops"].items())
    print(f"training phase ({tied:.0%} of groups tied, not forwarded): ours {phases['train']:.2f} s; matmul TFLOP/s "
          f"measured: {rates}; FLOPs = 6 x parameters x tokens, at the fastest rate:")
    for what, tokens in (("the step's tokens, each prompt once per group", step_tokens),
                         ("the step's tokens, a prompt per sample", unshared),
                         ("the token positions our training forwards ran", forwarded)):
        limit = 6 * o["params"] * tokens / (best * 1e12)
        print(f"- {what}: {tokens:.0f} tokens, {6 * o['params'] * tokens / 1e12:.2f} TFLOP, limit {limit:.2f} s: "
              f"ours = **{phases['train'] / limit:.2f}x** the limit")
    if not args.no_tiny:
        tiny = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "bench_grpo_vs_trl.py"),
                               "--threads", str(args.threads)], capture_output=True, text=True)
        print("\ntiny model (bench_grpo_vs_trl.py):" + tiny.stdout.split("\n\n", 1)[-1] if tiny.returncode == 0
              else f"\ntiny model bench failed: {tiny.stderr[-2000:]}")


if __name__ == "__main__":
    main()
