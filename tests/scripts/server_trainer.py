"""``Trainer(strategy=LightRFTFSDP | LightRFTDeepSpeed(ZeRO-3))`` on 2 CPU ranks with a
``RolloutEngineCallback`` that builds a ``VLLMServerEngine`` on each rank (``StrategyConfig.engine_type=
"vllm_server"``, the URLs in ``engine_kwargs``) over real vLLM servers, fed from the sharded actor through
the gloo weight-transfer backend (rank 0 sends, once to all servers). Each step: a greedy rollout (n=2, a
different prompt set per rank, spread over the servers) compared token for token with the sharded actor's
own greedy decode, and the engine's log-probs with the actor's; then a training step. Rank 0 prints
``RESULT {json}``.

    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/server_trainer.py {fsdp|deepspeed} MODEL_DIR URL[,URL]
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightrft_lightning.callbacks import RolloutEngineCallback, find_rollout_callback
from lightrft_lightning.engines import SamplingParams
from lightrft_lightning.engines.server import VLLMServerEngine
from tests.launch import report
from tests.vllm.common import greedy, max_logprob_diff, set_env

CONFIG = dict(bf16=False, train_batch_size=2, micro_train_batch_size=1, max_norm=0.0, zero_stage=3,
              dist_timeout_minutes=2.0, engine_type="vllm_server")
NEW = 8
PARAMS = SamplingParams(n=2, temperature=0.0, max_new_tokens=NEW, stop_at_eos=False)
STEPS = 2


def prompts_of(rank: int) -> list[list[int]]:
    return [[5 + rank, 6, 7], [9, 10 + rank, 11], [20 + 3 * rank, 21, 22]]


class Rollouts(LightningModule):
    def __init__(self, model_dir: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.actor = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
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
        return torch.optim.AdamW(self.actor.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(list(range(2 * STEPS)), batch_size=1)


def main(backend: str, model_dir: str, urls: list[str]) -> None:
    if backend == "fsdp":
        from lightrft_lightning.strategies.fsdp import LightRFTFSDP as Strategy
    else:
        from lightrft_lightning.strategies.deepspeed import LightRFTDeepSpeed as Strategy
    module, callback = Rollouts(model_dir), RolloutEngineCallback(bucket_bytes=20_000, engine_kwargs={"urls": urls, "api_key": "test-key", "timeout_s": 120})
    trainer = Trainer(accelerator="cpu", devices=2, strategy=Strategy(dict(CONFIG)), max_steps=STEPS, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      callbacks=[callback])
    engines = []

    class Keep(RolloutEngineCallback.__mro__[1]):  # a plain Callback: see which engine the callback built
        def on_train_start(self, trainer, pl_module):
            engines.append(callback.engine)

    trainer.callbacks.append(Keep())
    trainer.fit(module)
    engine = engines[0]
    local = {"matched": module.matched, "max_diff": max(module.diffs), "sharded": all(module.sharded),
             "changed": all(a != b for a, b in zip(module.rollouts, module.rollouts[1:])),
             "pushes": callback.stats["pushes"], "engine": type(engine).__name__,
             "versions": engine.weight_versions(), "urls": engine.urls}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if trainer.is_global_zero:
        summary = {"ranks": gathered, "prompts_matched": sum(sum(r["matched"]) for r in gathered),
                   "prompts_total": sum(len(r["matched"]) * len(prompts_of(0)) for r in gathered),
                   "max_logprob_diff": max(r["max_diff"] for r in gathered)}
        report(summary)
    else:
        report({})
    for r in gathered:
        assert isinstance(engine, VLLMServerEngine) and r["versions"] == [str(STEPS - 1)] * len(urls), r
        assert r["matched"] == [len(prompts_of(0))] * STEPS and r["pushes"] == STEPS, r
        assert r["sharded"] and r["changed"] and r["max_diff"] < 1e-4, r


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    set_env()
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(","))
    os._exit(0)  # vLLM's exit hooks tear down process groups report() already destroyed
