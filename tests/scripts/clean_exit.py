"""A user's script as it is usually written: two ``Trainer.fit`` runs on ``LightRFTFSDP`` and then the
seed's standalone loop with ``fsdp=True``, ending right after its last ``all_reduce`` with no
``destroy_process_group``, or (``--destroy``) with ``dist.barrier(); dist.destroy_process_group()``. Every rank
must exit 0 (gloo used to abort some ranks at interpreter exit).

    torchrun --nproc_per_node=2 tests/scripts/clean_exit.py [--destroy]
"""

import argparse
import sys

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lightrft_lightning import get_strategy
from lightrft_lightning.strategies.fsdp import LightRFTFSDP
from lightrft_lightning.tiny_models import tiny_causal_lm


class LM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.actor = tiny_causal_lm(seed=0, vocab_size=32)

    def training_step(self, batch, batch_idx):
        loss = self.actor(input_ids=batch, labels=batch).loss
        self.log("loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.actor.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(list(torch.randint(0, 32, (8, 8), generator=torch.Generator().manual_seed(0))), batch_size=2)


for _ in range(2):
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=LightRFTFSDP({"bf16": False}), max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LM())

args = argparse.Namespace(fsdp=True, bf16=False, micro_train_batch_size=2, train_batch_size=4, seed=1)
strategy = get_strategy(args)
strategy.setup_distributed()
actor = strategy.prepare(tiny_causal_lm(seed=1, vocab_size=32), is_rlhf=True)
optimizer = strategy.create_optimizer(actor)
for step in range(4):
    batch = torch.randint(0, 32, (2, 8))
    loss = actor(input_ids=batch, labels=batch).loss
    strategy.backward(loss, actor, optimizer)
    strategy.optimizer_step(optimizer, actor, None)
    mean = strategy.all_reduce(loss.item())
strategy.print(f"RESULT {{\"loss\": {mean}}}")
if "--destroy" in sys.argv[1:]:
    dist.barrier()
    dist.destroy_process_group()
