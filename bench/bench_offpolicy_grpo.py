"""GRPO on the real SmolLM2-135M-Instruct with a bf16 vLLM engine under an fp32 learner, with and without
the off-policy correction: reward per step, the mismatch metrics and the fraction truncated / masked.

Each setting runs in its own process (a vLLM engine per process), same seed, same prompts
(chat-rendered arithmetic, ``arithmetic_reward``), ``LightRFTFake``, one optimizer step per rollout (so
pi_old is the training forward's own detached log-probs). Run from the vLLM venv:

    .venv-vllm/bin/python bench/bench_offpolicy_grpo.py [--steps 30] [--settings none tis mis]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "none": {},
    "tis": {"rollout_is": "token", "rollout_is_threshold": 2.0},
    "mis": {"rollout_rs": "token", "rollout_rs_threshold": 1.5},
    "seq-tis": {"rollout_is": "sequence", "rollout_is_threshold": 2.0},
}
KEYS = ("reward", "loss/policy", "mismatch/logp_abs_diff", "mismatch/kl", "mismatch/ratio_max",
        "mismatch/tokens_truncated", "mismatch/seqs_truncated", "mismatch/tokens_masked", "mismatch/seqs_masked")


def run(setting: str, steps: int, prompts: int, n: int, new: int) -> list[dict]:
    import lightning.pytorch as pl
    import torch

    from lightrft_lightning import LightRFTFake
    from lightrft_lightning.algorithms import GRPO
    from lightrft_lightning.callbacks import RolloutEngineCallback
    from lightrft_lightning.data import PromptDataModule
    from lightrft_lightning.tasks import arithmetic_problems

    torch.set_num_threads(2)

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.steps: list[dict] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            m = {k: float(v) for k, v in trainer.callback_metrics.items()}
            self.steps.append({k: m[k] for k in KEYS if k in m})
            print("STEP " + json.dumps(self.steps[-1]), flush=True)

    pl.seed_everything(0, verbose=False)
    model = GRPO(model="smollm2-135m-instruct", apply_chat_template=True,
                 rewards={"lightrft_lightning.tasks:arithmetic_reward": 1.0}, n_samples_per_prompt=n,
                 max_new_tokens=new, temperature=1.0, micro_train_batch_size=4, actor_learning_rate=2e-6,
                 advantage_estimator="group_norm", clip_high=0.28, **SETTINGS[setting])
    data = PromptDataModule(prompts=arithmetic_problems(prompts * steps, seed=5), batch_size=prompts, shuffle=False)
    record = Record()
    engine = RolloutEngineCallback(bucket_bytes=32 << 20, engine_kwargs={"enforce_eager": True, "dtype": "bfloat16",
                                                                         "max_model_len": 1024})
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=LightRFTFake({"engine_type": "vllm", "seed": 0}),
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[engine, record])
    trainer.fit(model, data)
    return record.steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--settings", nargs="+", default=["none", "tis"])
    parser.add_argument("--run")
    args = parser.parse_args()
    if args.run:
        warnings.filterwarnings("ignore")
        steps = run(args.run, args.steps, args.prompts, args.n, args.new)
        print("RESULT " + json.dumps(steps), flush=True)
        os._exit(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    results = {}
    for setting in args.settings:
        proc = subprocess.run([sys.executable, __file__, "--run", setting, "--steps", str(args.steps), "--prompts",
                               str(args.prompts), "--n", str(args.n), "--new", str(args.new)],
                              capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(f"{setting} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            continue
        results[setting] = json.loads(lines[-1][7:])
        print(f"{setting}: {json.dumps(results[setting])}", flush=True)
    print(f"\nGRPO, SmolLM2-135M-Instruct, bf16 vLLM engine, fp32 learner, {args.prompts} prompts x {args.n} per step, "
          f"<= {args.new} new tokens")
    for setting, steps in results.items():
        print(f"\n{setting} {SETTINGS[setting]}")
        print("| step | reward | mean abs diff | KL k3 | max ratio | tokens truncated | seqs truncated | tokens masked | seqs masked |")
        print("|---|---|---|---|---|---|---|---|---|")
        for i, s in enumerate(steps):
            cells = [s.get(k) for k in KEYS if k != "loss/policy"]
            print(f"| {i} | " + " | ".join("-" if c is None else f"{c:.3g}" for c in cells) + " |")
        mean = {k: sum(s.get(k, 0.0) for s in steps) / len(steps) for k in KEYS}
        print("mean: " + ", ".join(f"{k}={v:.4g}" for k, v in mean.items()))


if __name__ == "__main__":
    main()
