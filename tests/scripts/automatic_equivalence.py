"""An ordinary automatic-optimization Lightning project (a tied Hugging Face causal LM, AdamW with a
warmup scheduler dict, ``gradient_clip_val``, ``accumulate_grad_batches``, ``self.log(sync_dist=True)``,
a validation loop, ``ModelCheckpoint`` and a resume from it) fitted under each strategy named, for each
(accumulation, clipping) case; writes the final parameters of each run to
``OUT_DIR/<strategy>-acc<A>-<clip|noclip>.safetensors`` and, for the resumed run,
``OUT_DIR/<strategy>-resumed.safetensors`` (the ``acc2-clip`` case stopped after its first epoch and
resumed).

    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/automatic_equivalence.py OUT_DIR NAME [NAME ...]
    PYTHONPATH=. python tests/scripts/automatic_equivalence.py OUT_DIR lightrft_fake     (one process)
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler
from transformers import LlamaConfig, LlamaForCausalLM, get_linear_schedule_with_warmup

import lightrft_lightning  # noqa: F401  (registers the strategy names)
from tests.launch import report

GLOBAL_BATCH, BATCHES, EPOCHS, SEQ, VOCAB, CLIP = 4, 4, 2, 12, 48, 0.5
CASES = [(1, None), (1, CLIP), (2, None), (2, CLIP)]
g = torch.Generator().manual_seed(0)
TOKENS = torch.randint(0, VOCAB, (BATCHES * GLOBAL_BATCH, SEQ), generator=g)
VAL_TOKENS = torch.randint(0, VOCAB, (2 * GLOBAL_BATCH, SEQ), generator=g)


def causal_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).float()


class LanguageModel(L.LightningModule):
    def __init__(self, world: int) -> None:
        super().__init__()
        self.model = causal_lm()
        self.world = world

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss, sync_dist=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.01)
        scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=100)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _loader(self, tokens: torch.Tensor) -> DataLoader:
        rows = list(tokens)
        sampler = DistributedSampler(rows, num_replicas=self.world, rank=self.global_rank, shuffle=False)
        return DataLoader(rows, batch_size=GLOBAL_BATCH // self.world, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(TOKENS)

    def val_dataloader(self) -> DataLoader:
        return self._loader(VAL_TOKENS)


def trainer(name: str, accumulate: int, clip: Optional[float], max_steps: int, callbacks: list) -> L.Trainer:
    devices = 1 if name == "lightrft_fake" else int(os.environ.get("WORLD_SIZE", 1))
    return L.Trainer(accelerator="cpu", devices=devices, strategy=name, max_steps=max_steps, precision="32-true",
                     accumulate_grad_batches=accumulate, gradient_clip_val=clip, logger=False,
                     enable_checkpointing=bool(callbacks), callbacks=callbacks, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, val_check_interval=2,
                     num_sanity_val_steps=0, limit_val_batches=1)


def full_state(strategy, module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The unsharded parameters, a tied one once (a collective under FSDP2 / ZeRO-3)."""
    state = strategy.full_state_dict(module.model) if hasattr(strategy, "full_state_dict") else module.model.state_dict()
    if int(os.environ.get("RANK", 0)) != 0:
        return {}  # FSDP2 gathers to rank 0 only
    return {n: state[n].detach().cpu().clone().contiguous() for n, _ in module.model.named_parameters()}


def save(state: dict[str, torch.Tensor], path: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        save_file(state, path)


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    world = int(os.environ.get("WORLD_SIZE", 1))
    steps = EPOCHS * BATCHES  # optimizer steps at accumulation 1; half as many at 2
    for name in names:
        module_world = 1 if name == "lightrft_fake" else world
        for accumulate, clip in CASES:
            module = LanguageModel(module_world)
            t = trainer(name, accumulate, clip, steps // accumulate, [])
            t.fit(module)
            save(full_state(t.strategy, module), os.path.join(out, f"{name}-acc{accumulate}-{'clip' if clip else 'noclip'}.safetensors"))
        # stop after the first epoch with a ModelCheckpoint, resume from it in a new Trainer
        ckpt_dir = os.path.join(out, f"{name}-ckpt")
        first = trainer(name, 2, CLIP, BATCHES // 2, [ModelCheckpoint(dirpath=ckpt_dir, save_on_train_epoch_end=True)])
        first.fit(LanguageModel(module_world))
        path = first.strategy.broadcast(first.checkpoint_callback.best_model_path)
        module = LanguageModel(module_world)
        second = trainer(name, 2, CLIP, steps // 2, [ModelCheckpoint(dirpath=ckpt_dir + "-2")])
        second.fit(module, ckpt_path=path)
        save(full_state(second.strategy, module), os.path.join(out, f"{name}-resumed.safetensors"))
    report({"names": names})


if __name__ == "__main__":
    main()
