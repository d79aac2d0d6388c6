"""``Trainer(strategy=LightRFTFSDP | LightRFTDeepSpeed(ZeRO-3))`` on 2 CPU ranks with a
``RolloutEngineCallback`` that builds an HFEngine on each rank from the sharded actor's config.
Each step generates (pushing the weights the optimizer just changed), checks the engine's logits
against the actor's, and trains on the samples. After the fit, a push with ``push_weights`` where only
rank 0 holds an engine (level-2 sleep) checks the bare streaming path. Rank 0 prints
``ENGINE_TRAINER {json}``.

Usage: engine_trainer.py {fsdp|deepspeed}
"""

import json
import sys

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from lightrft_lightning.callbacks import RolloutEngineCallback, find_rollout_callback
from lightrft_lightning.callbacks.rollout_engine import hf_model
from lightrft_lightning.engines import EngineStateError, HFEngine, SamplingParams, iter_weight_buckets, push_weights
from lightrft_lightning.tiny_models import tiny_causal_lm

CONFIG = dict(bf16=False, train_batch_size=2, micro_train_batch_size=1, max_norm=0.0, zero_stage=3,
              dist_timeout_minutes=1.0)
PROMPTS = [[5, 6, 7], [9, 10, 11]]
PARAMS = SamplingParams(n=2, max_new_tokens=6, seed=0, stop_at_eos=False)


class Rollouts(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.actor = tiny_causal_lm(seed=0)
        self.rollouts, self.diffs, self.sharded = [], [], []

    def training_step(self, batch, batch_idx):
        callback = find_rollout_callback(self.trainer)
        self.sharded.append(all(hasattr(p, "ds_id") or hasattr(p, "full_tensor") for p in self.actor.parameters()))
        out = callback.generate(self, PROMPTS, PARAMS)
        self.rollouts.append([c.token_ids for c in out])
        seqs = torch.tensor([PROMPTS[c.prompt_index] + c.token_ids for c in out])
        with torch.no_grad():
            actor_logits = self.actor(input_ids=seqs).logits
            self.diffs.append((callback.engine.model(input_ids=seqs).logits - actor_logits).abs().max().item())
        logits = self.actor(input_ids=seqs).logits[:, len(PROMPTS[0]) - 1:-1]
        loss = -torch.log_softmax(logits, -1).gather(-1, seqs[:, len(PROMPTS[0]):, None]).mean()
        strategy, opt = self.trainer.strategy, self.optimizers()
        strategy.backward(loss, self.actor, opt)
        strategy.optimizer_step(opt, self.actor, None, name="actor")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.actor.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(list(range(6)), batch_size=1)


def main(backend: str) -> None:
    if backend == "fsdp":
        from lightrft_lightning.strategies.fsdp import LightRFTFSDP as Strategy
    else:
        from lightrft_lightning.strategies.deepspeed import LightRFTDeepSpeed as Strategy
    module, callback = Rollouts(), RolloutEngineCallback(bucket_bytes=8192, sleep_level=1)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=Strategy(dict(CONFIG)), max_steps=3, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      callbacks=[callback])
    trainer.fit(module)
    result = {"pushes": callback.stats["pushes"], "max_diff": max(module.diffs),
              "changed": [a != b for a, b in zip(module.rollouts, module.rollouts[1:])],
              "sync_bytes": callback.stats["sync_bytes"], "engines_after_fit": len(trainer.strategy.engines),
              "sharded": all(module.sharded)}
    result.update(push_to_rank_0_only(module.actor, trainer.is_global_zero))
    if backend == "fsdp":
        result["row_gather_exact"] = row_gather_exact()
    if trainer.is_global_zero:
        print("ENGINE_TRAINER " + json.dumps(result), flush=True)
    assert result["max_diff"] <= 1e-6 and all(result["changed"]) and result["pushes"] == 3 and result["sharded"], result
    assert result.get("row_gather_exact", True), result
    # leave together: a rank that exits while gloo's threads still run aborts at teardown
    dist.barrier()
    dist.destroy_process_group()


def row_gather_exact() -> bool:
    """The sliced gather of a parameter larger than a bucket, with rows that do not split evenly."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightrft_lightning.engines.weight_sync import _full_tensor

    layer = torch.nn.Linear(8, 37, bias=False)
    fully_shard(layer, mesh=init_device_mesh("cpu", (2,)))
    return all(torch.equal(_full_tensor(layer.weight, budget), layer.weight.full_tensor()) for budget in (64, 200, 1000))


def push_to_rank_0_only(actor, is_rank_0: bool, bucket: int = 4096) -> dict:
    model = hf_model(actor)
    engine = HFEngine.from_config(model.config, pad_token_id=0, eos_token_id=3, sleep_level=2) if is_rank_0 else None
    out = {"push_bytes": push_weights(model, engine, bucket, dtype=torch.float32),
           "full_bytes": sum(p.ds_numel if hasattr(p, "ds_id") else p.numel() for p in model.parameters()) * 4,
           "buckets_within_budget": all(sum(t.numel() * t.element_size() for _, t in b) <= bucket or len(b) == 1
                                        for b in iter_weight_buckets(model, bucket))}
    ids = torch.tensor([PROMPTS[0] + [20, 21, 22]])
    with torch.no_grad():
        logits = actor(input_ids=ids).logits  # a collective forward on every rank
    if engine is not None:
        out["push_max_diff"] = (engine.model(input_ids=ids).logits - logits).abs().max().item()
        engine.sleep()
        engine.wake_up()
        try:
            engine.generate(PROMPTS, PARAMS)
            out["stale_refused"] = False
        except EngineStateError:
            out["stale_refused"] = True
        assert out["push_max_diff"] <= 1e-6 and out["stale_refused"] and out["buckets_within_budget"], out
        assert out["push_bytes"] == out["full_bytes"], out
    return out


if __name__ == "__main__":
    main(sys.argv[1])
