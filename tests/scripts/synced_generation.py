"""Validation generation on 2 ranks whose prompts end at different steps (issue 29, risk 10).

    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/synced_generation.py lightrft_deepspeed_stage_3

A tiny random model whose EOS logit is scaled up ends some prompts' greedy completions early and not
others; the two validation prompts are chosen (before fit, on the unsharded model, identically on every
rank) so that rank 0's completion ends at EOS within two tokens and rank 1's never does. Under a
sharded actor (ZeRO-3, FSDP2) every forward gathers parameters over all ranks, so a rank that stops
generating first must keep joining those gathers until every rank is done (``synced_gpus``), else the
ranks' collectives no longer match (a hang, or an error). Each rank reports the completion it
generated under ``Trainer.fit`` (the sanity-check validation, then one training step) and the one the
unsharded model gives.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist

from lightrft_lightning.algorithms import GRPO
from lightrft_lightning.data import PromptDataModule
from tests.launch import report

MAX_NEW_TOKENS = 8


class RecordingGRPO(GRPO):
    """GRPO that keeps the validation completions it generated."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.generated: list[str] = []

    def _actor_generate(self, prompt_ids, num, do_sample):
        out = super()._actor_generate(prompt_ids, num, do_sample)
        self.generated.extend(out)
        return out


def greedy(module: GRPO, prompt: str) -> list[int]:
    ids = torch.tensor([module.tokenizer(prompt)["input_ids"]])
    out = module.actor.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                do_sample=False, pad_token_id=module.tokenizer.pad_token_id, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def pick_prompts(module: GRPO) -> tuple[list[str], list[int]]:
    """An early-ending prompt and one that never ends, and the step each one's EOS comes at (0: none)."""
    eos = module.tokenizer.eos_token_id
    with torch.no_grad():
        module.actor.lm_head.weight[eos] *= 6.0  # untied (tiny_models): only the output logit grows
    steps = {}
    for a in "0123456789":
        for b in "0123456789":
            tokens = greedy(module, a + b)
            steps[a + b] = tokens.index(eos) + 1 if eos in tokens else 0
    early = next((p for p, s in steps.items() if 0 < s <= 2), None)
    never = next((p for p, s in steps.items() if s == 0), None)
    if early is None or never is None:
        raise RuntimeError(f"no early/never-ending prompt pair among {steps}")
    return [early, never], [steps[early], steps[never]]


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import lightning.pytorch as pl

    strategy = sys.argv[1]
    pl.seed_everything(0)
    module = RecordingGRPO(model="tiny", model_config={"hidden_size": 64, "intermediate_size": 128,
                                                        "tie_word_embeddings": False},
                           tokenizer="char", tokenizer_chars="0123456789",
                           rewards={"lightrft_lightning.tasks:counting_reward": 1.0}, n_samples_per_prompt=2,
                           max_new_tokens=MAX_NEW_TOKENS, micro_train_batch_size=4, kl_coef=0.0)
    prompts, eos_steps = pick_prompts(module)
    # the completion ends before its EOS (step s counts from 1; 0: no EOS)
    expected = [module.tokenizer.decode(greedy(module, p)[:s - 1 if s else None]) for p, s in zip(prompts, eos_steps)]
    rows = [{"prompt": p, "answer": "1234"} for p in prompts]
    data = PromptDataModule(prompts=rows * 2, batch_size=2, shuffle=False, val_prompts=rows, val_batch_size=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, num_sanity_val_steps=1,
                         limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    rank = dist.get_rank()
    mine = {"prompt": prompts[rank], "eos_step": eos_steps[rank], "generated": module.generated,
            "expected": expected[rank]}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    report({"ranks": everyone, "steps": trainer.global_step})


if __name__ == "__main__":
    main()
