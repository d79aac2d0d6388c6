"""A few GRPO steps on the real SmolLM2-135M-Instruct (tied embeddings, chat-rendered arithmetic prompts)
with a real ``VLLMEngine`` built from ``StrategyConfig(engine_type="vllm")`` under ``LightRFTFake``, fp32.
After the last step, a greedy rollout (n=2) through the callback is compared token for token with the
trained actor's own greedy decode, and the engine's log-probs with the actor's. Prints ``RESULT {json}``.
With ``lora``: LoRA adapters train, the engine gets the merged weights and is compared with peft's
merge of the actor (applied to a copy).

    PYTHONPATH=. python tests/scripts/vllm_grpo_real.py [STEPS [lora]]
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings

import lightning.pytorch as pl
import torch

from lightrft_lightning import LightRFTFake
from lightrft_lightning.algorithms import GRPO
from lightrft_lightning.callbacks import RolloutEngineCallback, find_rollout_callback
from lightrft_lightning.data import PromptDataModule, render_prompts
from lightrft_lightning.engines import SamplingParams, VLLMEngine
from lightrft_lightning.lora import lora_layers
from lightrft_lightning.tasks import arithmetic_problems
from tests.launch import report
from tests.vllm.common import greedy, max_logprob_diff, set_env

CHECK = ["What is 12 + 7?", "What is the capital of France?", "Name a colour."]
NEW = 12


def digit_share(prompts, completions, metadata):
    """Dense: samples of one prompt score differently, so a group has a learning signal."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


class Check(pl.Callback):
    """After the last step (a push of the trained weights): greedy n=2 vs the actor's greedy decode."""

    def __init__(self) -> None:
        self.summary: dict = {}
        self.metrics: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        if trainer.global_step >= trainer.max_steps:
            self.check(trainer, pl_module)

    def check(self, trainer, pl_module) -> None:
        callback = find_rollout_callback(trainer)
        _, ids = render_prompts([{"prompt": p} for p in CHECK], pl_module.tokenizer, apply_chat_template=True)
        out = callback.generate(pl_module, ids, SamplingParams(n=2, temperature=0.0, max_new_tokens=NEW, stop_at_eos=False))
        actor = copy.deepcopy(pl_module.actor).eval()
        for _, layer in lora_layers(actor):
            layer.merge()  # a LoRA actor: what the merged weights compute
        ref = greedy(actor, ids, NEW)
        engine = callback.engine
        self.summary = {
            "engine": type(engine).__name__, "engine_dtype": str(engine.dtype), "pushes": callback.stats["pushes"],
            "prompts_matched": sum(out[2 * i].token_ids == ref[i] == out[2 * i + 1].token_ids for i in range(len(ids))),
            "prompts": len(ids), "max_logprob_diff": max_logprob_diff(actor, ids, out),
            "answer": pl_module.tokenizer.decode(out[0].token_ids, skip_special_tokens=True)}


def main(steps: int, lora: bool) -> None:
    pl.seed_everything(0, verbose=False)
    model = GRPO(model="smollm2-135m-instruct", apply_chat_template=True,
                 rewards={"tests.scripts.vllm_grpo_real:digit_share": 1.0}, n_samples_per_prompt=2,
                 max_new_tokens=8, temperature=1.0, micro_train_batch_size=4,
                 actor_learning_rate=1e-3 if lora else 1e-5, advantage_estimator="group_norm",
                 lora={"r": 8, "alpha": 16} if lora else None)
    data = PromptDataModule(prompts=arithmetic_problems(16, seed=3), batch_size=2, shuffle=False)
    check = Check()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=LightRFTFake({"engine_type": "vllm", "seed": 0}),
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[RolloutEngineCallback(bucket_bytes=32 << 20, engine_kwargs={"enforce_eager": True}),
                                    check])
    trainer.fit(model, data)
    summary = {**check.summary, "steps": len(check.metrics),
               "losses": [m.get("loss/policy") for m in check.metrics],
               "rewards": [m.get("reward") for m in check.metrics]}
    report(summary)
    assert summary["engine"] == VLLMEngine.__name__ and summary["engine_dtype"] == "torch.float32", summary
    assert summary["pushes"] == steps + 1, summary  # one per step, and the check's after the last step
    assert summary["prompts_matched"] == summary["prompts"] and summary["max_logprob_diff"] < 1e-3, summary
    assert summary["steps"] == steps and all(v is not None and math.isfinite(v) for v in summary["losses"]), summary


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    set_env()
    torch.set_num_threads(2)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2, sys.argv[2:] == ["lora"])
    os._exit(0)  # skip vLLM's exit hooks
