"""GRPO with sampling (temperature 1) resumes exactly under DCPCheckpoint on 2 gloo ranks:
4 steps straight vs 2 steps + a resumed run (other seed) to step 4. Rank 0 prints
``GRPO_RESUME {json}`` with the per-step rewards and losses and the max parameter difference.

Usage: ckpt_grpo.py {fsdp,deepspeed} DIR [lora]

With ``lora``: a tied tiny model with LoRA adapters and a KL term (the reference: the base with the
adapters off); also printed: the checkpoint's state-dict keys (the adapters only); the straight run
exports its adapter (``DIR/a/adapter``) and merged model (``DIR/a/merged``) from both ranks.
"""

import json
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from ckpt_common import LossRecorder, params
from ckpt_resume import strategy
from lightrft_lightning.algorithms import GRPO
from lightrft_lightning.callbacks import DCPCheckpoint
from lightrft_lightning.checkpoint import read_state_dict
from lightrft_lightning.data import PromptDataModule
from lightrft_lightning.tasks import counting_prompts


LORA = dict(lora={"r": 4, "alpha": 8}, kl_coef=0.05, model_config={"hidden_size": 32, "tie_word_embeddings": True})


class Export(pl.Callback):
    """At the end of training (2 ranks, the actor still sharded): the adapter and the merged model."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.strategy.save_model(pl_module.actor, None, str(self.out / "adapter"))
        trainer.strategy.save_merged_model(pl_module.actor, None, str(self.out / "merged"))


def fit(name: str, max_steps: int, dirpath: Path, seed: int, lora: bool = False, export: bool = False):
    pl.seed_everything(seed, verbose=False)
    settings = LORA if lora else {"model_config": {"hidden_size": 32}}
    model = GRPO(tokenizer_chars="0123456789", n_samples_per_prompt=2, max_new_tokens=4, temperature=1.0,
                 micro_train_batch_size=4, actor_learning_rate=1e-2, **settings)
    data = PromptDataModule(prompts=counting_prompts(32, seed=3), batch_size=2)
    rewards, losses = LossRecorder("reward"), LossRecorder("loss/policy")
    callback = DCPCheckpoint(dirpath, every_n_train_steps=2)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy(name), max_steps=max_steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0,
                         callbacks=[rewards, losses, callback, *([Export(dirpath)] if export else [])])
    trainer.fit(model, data)
    return params(model.actor), rewards.losses, losses.losses, callback


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    name, root = sys.argv[1], Path(sys.argv[2])
    lora = sys.argv[3:] == ["lora"]
    straight, rewards, losses, _ = fit(name, 4, root / "a", seed=0, lora=lora, export=lora)
    fit(name, 2, root / "b", seed=0, lora=lora)
    resumed, rewards2, losses2, callback = fit(name, 4, root / "b", seed=7, lora=lora)
    stored = sorted(read_state_dict(str(root / "b" / "global_step2")))  # verifies on every rank
    if int(os.environ["RANK"]) == 0:
        print("GRPO_RESUME " + json.dumps({
            "stored_keys": stored,
            "straight_rewards": rewards, "resumed_rewards": rewards2, "straight_losses": losses,
            "resumed_losses": losses2, "resumed_from": callback.resumed_from,
            "max_param_diff": max(float((straight[k] - resumed[k]).abs().max()) for k in straight)}), flush=True)


if __name__ == "__main__":
    main()
