"""One GRPO step on the real SmolLM2-135M-Instruct (tied embeddings, chat-rendered arithmetic prompts),
then the tied-weight checks: the rollout engine's logits after a weight sync and an exported directory's
logits against the trained actor's. Greedy rollouts and a batch-normalized advantage make the step
independent of how prompts split over ranks, so 2 FSDP2 ranks must log what 1 process logs.

The Lightning checkpoint it writes (``OUT_DIR/<strategy>-ckpt``) is for the convert CLI's tied check.

    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/real_model_grpo.py lightrft_fsdp OUT_DIR
    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/real_model_grpo.py lightrft_deepspeed_stage_3 OUT_DIR
    PYTHONPATH=. python tests/scripts/real_model_grpo.py lightrft_fake OUT_DIR
"""

from __future__ import annotations

import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from transformers import AutoModelForCausalLM

from lightrft_lightning.algorithms import GRPO
from lightrft_lightning.data import PromptDataModule, render_prompts
from lightrft_lightning.engines.hf import HFEngine
from lightrft_lightning.engines.weight_sync import push_weights
from lightrft_lightning.tasks import arithmetic_problems
from tests.launch import report

PROMPTS = 4  # per step, over all ranks


def digit_share(prompts, completions, metadata):
    """Dense: greedy completions of different prompts score differently."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def main() -> None:
    name, out = sys.argv[1], sys.argv[2]
    world = int(os.environ.get("WORLD_SIZE", 1))
    pl.seed_everything(0, verbose=False)
    model = GRPO(model="smollm2-135m-instruct", apply_chat_template=True,
                 rewards={"tests.scripts.real_model_grpo:digit_share": 1.0}, n_samples_per_prompt=2,
                 max_new_tokens=6, temperature=0.0, micro_train_batch_size=8 // world, actor_learning_rate=1e-4,
                 advantage_estimator="reinforce++")
    data = PromptDataModule(prompts=arithmetic_problems(16, seed=3), batch_size=PROMPTS // world, shuffle=False)
    metrics: dict[str, float] = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    logger = pl.loggers.CSVLogger(os.path.join(out, f"{name}-logs"), name="", version="")  # grad_norm: logged steps only
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=name, max_steps=1, logger=logger, log_every_n_steps=1,
                         callbacks=[Record()], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, data)
    trainer.save_checkpoint(os.path.join(out, f"{name}-ckpt"))
    strategy, actor = trainer.strategy, model.actor
    _, ids = render_prompts([{"prompt": "What is 12 + 7?"}], model.tokenizer, apply_chat_template=True)
    ids = torch.tensor(ids)
    with torch.no_grad():
        logits = actor(input_ids=ids).logits  # FSDP2: a collective, full logits on every rank
    # a fresh engine from the config (the callback's is released at the end of fit), filled by a sync
    engine = HFEngine.from_config(actor.config, dtype=torch.float32, pad_token_id=0) if strategy.is_rank_0() else None
    push_weights(actor, engine, bucket_bytes=64 << 20)  # every rank: gathers the sharded actor
    strategy.save_model(actor, model.tokenizer, os.path.join(out, f"{name}-hf"))
    summary = {"loss": metrics["loss/policy"], "grad_norm": metrics["actor/grad_norm"], "reward": metrics["reward"]}
    if strategy.is_rank_0():
        with torch.no_grad():
            summary["engine_diff"] = (engine.model(input_ids=ids).logits - logits).abs().max().item()
            exported = AutoModelForCausalLM.from_pretrained(os.path.join(out, f"{name}-hf"), dtype=torch.float32)
            summary["export_diff"] = (exported(input_ids=ids).logits - logits).abs().max().item()
        summary["engine_tied"] = engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
        summary["export_tied"] = exported.lm_head.weight is exported.model.embed_tokens.weight
    report(summary)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    main()
