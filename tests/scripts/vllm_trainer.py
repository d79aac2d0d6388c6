"""``Trainer(strategy=LightRFTFSDP | LightRFTDeepSpeed(ZeRO-3))`` on 2 CPU ranks with a
``RolloutEngineCallback`` that builds a real ``VLLMEngine`` on each rank (``StrategyConfig.engine_type=
"vllm"``, ``external_launcher``, ``data_parallel_size=2``) from the actor's directory, fed from the
sharded actor. Each step: a greedy rollout (n=2, a different prompt set per rank) compared token for
token with the sharded actor's own greedy decode, and the engine's log-probs with the actor's; then
a training step. Rank 0 prints ``RESULT {json}``.

    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/vllm_trainer.py {fsdp|deepspeed} MODEL_DIR
"""

import os
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightrft_lightning.callbacks import RolloutEngineCallback, find_rollout_callback
from lightrft_lightning.engines import SamplingParams, VLLMEngine
from lightrft_lightning.lora import LoRASettings, apply_lora
from tests.launch import report
from tests.vllm.common import greedy, max_logprob_diff, set_env

CONFIG = dict(bf16=False, train_batch_size=2, micro_train_batch_size=1, max_norm=0.0, zero_stage=3,
              dist_timeout_minutes=2.0, engine_type="vllm")
NEW = 8
PARAMS = SamplingParams(n=2, temperature=0.0, max_new_tokens=NEW, stop_at_eos=False)
STEPS = 3


def prompts_of(rank: int) -> list[list[int]]:
    return [[5 + rank, 6, 7], [9, 10 + rank, 11], [20 + 3 * rank, 21, 22]]


class Rollouts(LightningModule):
    def __init__(self, model_dir: str, steps: int = STEPS, lora: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.steps = steps
        self.actor = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if lora:  # rank 8 on every projection; lr 0.05 moves the adapter enough to change greedy decodes
            # the adapters' random init the same in every run (importing vLLM seeds torch from the clock), so
            # whether a step changes the greedy decodes is decided here, not by the run
            torch.manual_seed(0)
            apply_lora(self.actor, LoRASettings.parse({"r": 8, "alpha": 16}, "Rollouts"), "Rollouts")
        self.matched, self.diffs, self.sharded, self.rollouts = [], [], [], []

    def training_step(self, batch, batch_idx):
        callback = find_rollout_callback(self.trainer)
        prompts = prompts_of(self.global_rank)
        self.sharded.append(all(hasattr(p, "ds_id") or hasattr(p, "full_tensor") for p in self.actor.parameters()))
        out = callback.generate(self, prompts, PARAMS)
        self.actor.eval()
        ref = greedy(self.actor, prompts, NEW)  # collective forwards, same shapes on every rank
        self.matched.append(sum(out[2 * i].token_ids == ref[i] == out[2 * i + 1].token_ids for i in range(len(prompts))))
        self.diffs.append(max_logprob_diff(self.actor, prompts, out))
        self.rollouts.append([c.token_ids for c in out])
        self.actor.train()
        ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(batch_idx))
        loss = -torch.log_softmax(self.actor(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
        strategy, opt = self.trainer.strategy, self.optimizers()
        strategy.backward(loss, self.actor, opt)
        strategy.optimizer_step(opt, self.actor, None, name="actor")

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.actor.parameters() if p.requires_grad], lr=0.05)

    def train_dataloader(self):
        return DataLoader(list(range(2 * self.steps)), batch_size=1)


def fit(backend: str, model: Rollouts, callback: RolloutEngineCallback, config: dict) -> tuple[Trainer, Any]:
    """Fit ``model`` on 2 ranks of ``backend`` with ``callback``; returns the Trainer and the engine it built."""
    if backend == "fsdp":
        from lightrft_lightning.strategies.fsdp import LightRFTFSDP as Strategy
    else:
        from lightrft_lightning.strategies.deepspeed import LightRFTDeepSpeed as Strategy
    trainer = Trainer(accelerator="cpu", devices=2, strategy=Strategy(dict(config)), max_steps=model.steps,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=[callback])
    engines = []

    class Keep(Callback):  # see which engine the callback built
        def on_train_start(self, trainer, pl_module):
            engines.append(callback.engine)

    trainer.callbacks.append(Keep())
    trainer.fit(model)
    return trainer, engines[0]


def gather_and_report(trainer: Trainer, model: Rollouts, callback: RolloutEngineCallback, **extra: Any) -> list[dict]:
    """Each rank's matches, log-prob gap and pushes (with ``extra``), gathered; rank 0 reports the summary."""
    local = {"matched": model.matched, "max_diff": max(model.diffs), "sharded": all(model.sharded),
             "changed": all(a != b for a, b in zip(model.rollouts, model.rollouts[1:])),
             "pushes": callback.stats["pushes"], **extra}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if trainer.is_global_zero:
        report({"ranks": gathered, "prompts_matched": sum(sum(r["matched"]) for r in gathered),
                "prompts_total": sum(len(r["matched"]) * len(prompts_of(0)) for r in gathered),
                "max_logprob_diff": max(r["max_diff"] for r in gathered)})
    else:
        report({})
    for r in gathered:
        assert r["matched"] == [len(prompts_of(0))] * model.steps and r["pushes"] == model.steps, r
        assert r["sharded"] and r["changed"] and r["max_diff"] < 1e-4, r
    return gathered


def main(backend: str, model_dir: str) -> None:
    model, callback = Rollouts(model_dir), RolloutEngineCallback(bucket_bytes=20_000, sleep_level=1)
    trainer, engine = fit(backend, model, callback, CONFIG)
    for r in gather_and_report(trainer, model, callback, engine=type(engine).__name__,
                               dp=engine.llm.llm_engine.vllm_config.parallel_config.data_parallel_size,
                               sleep_mode=engine.sleep_mode, reloads=engine.reloads):
        assert isinstance(engine, VLLMEngine) and r["dp"] == 2 and not r["sleep_mode"], r


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    set_env()
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
    os._exit(0)  # vLLM's exit hooks tear down process groups report() already destroyed
