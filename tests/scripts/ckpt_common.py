"""A small manual-optimization module for the checkpoint tests (imported by tests and by
tests/scripts/ckpt_*.py): every step draws from the torch, numpy and python RNGs and reads its
prompts from ``PromptDataModule``, so a resume that misses any of them changes the numbers."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from lightrft_lightning.data import PromptDataModule
from lightrft_lightning.tiny_models import tiny_causal_lm


class NoisyLM(pl.LightningModule):
    """Samples tokens (torch RNG), scales the loss with numpy and python random numbers, and steps
    through the LightRFT call shapes with a scheduler and gradient accumulation."""

    def __init__(self, seed: int = 0, hidden_size: int = 32, nonfinite_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.actor = tiny_causal_lm(seed=seed, hidden_size=hidden_size)
        self.nonfinite_at = set(nonfinite_at)

    def configure_optimizers(self):
        strategy = self.trainer.strategy
        optimizer = strategy.create_optimizer(self.actor, lr=1e-2)
        if type(strategy).__name__ == "LightRFTDeepSpeed":  # it wraps the children in engines at setup
            self.scheduler = None
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.9)
        self.actor, optimizer, scheduler = strategy.prepare((self.actor, optimizer, scheduler))
        self.scheduler = scheduler
        return optimizer

    def training_step(self, batch, batch_idx):
        strategy = self.trainer.strategy
        optimizer = self.optimizers()
        index = batch["index"]
        losses = []
        for micro in range(2):  # two micro-batches per optimizer step (accumulation 2)
            prompt = (index[:, None] * 7 + torch.arange(6)[None]) % 64
            with torch.no_grad():
                logits = self.actor(input_ids=prompt).logits[:, -1]
                sampled = torch.multinomial(torch.softmax(logits.float(), -1), 4, replacement=True)
            ids = torch.cat([prompt, sampled], dim=1)
            loss = self.actor(input_ids=ids, labels=ids).loss
            loss = loss * (1 + 0.1 * float(np.random.rand())) * (1 + 0.1 * random.random())
            if self.global_step in self.nonfinite_at and micro == 0:
                loss = loss * float("nan")
            strategy.backward(loss, self.actor, optimizer)
            strategy.optimizer_step(optimizer, self.actor, self.scheduler, name="actor")
            losses.append(loss.detach())
        self.log("loss", torch.stack(losses).mean(), batch_size=1)


class LossRecorder(Callback):
    """Records ``(global_step, metric)`` after each training step."""

    def __init__(self, key: str = "loss") -> None:
        self.key = key
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append((trainer.global_step, float(trainer.callback_metrics[self.key])))


def prompts(n: int = 64) -> PromptDataModule:
    return PromptDataModule(prompts=[f"p{i}" for i in range(n)], batch_size=2, seed=0)


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters on CPU (gathers DTensors)."""
    out = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        out[name] = tensor.detach().cpu().clone()
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
