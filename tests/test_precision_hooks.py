"""The LightRFT call shape (``strategy.backward(loss, model, optimizer)``, ``strategy.optimizer_step(
optimizer, model, scheduler)``) inside a Trainer goes through the precision plugin (GradScaler loss
scaling, unscaling before clipping, the scale lowered on an overflow) and fires the optimizer hooks."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightrft_lightning import LightRFTFake, StrategyConfig


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.backward_losses: list[float] = []
        self.after_backward_norms: list[float] = []
        self.before_step_norms: list[float] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.backward_losses.append(loss.item())

    def on_after_backward(self, trainer, pl_module):
        self.after_backward_norms.append(_grad_norm(pl_module.actor))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_step_norms.append(_grad_norm(pl_module.actor))


def _grad_norm(model: nn.Module) -> float:
    return torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item()


class LightRFTShape(L.LightningModule):
    def __init__(self, poison_step: int = -1) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.actor = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.poison_step = poison_step
        self.raw_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        strategy, opt = self.trainer.strategy, self.optimizers()
        loss = self.actor(batch).pow(2).mean()
        if batch_idx == self.poison_step:
            loss = loss * float("inf")
        self.raw_losses.append(loss.item())
        strategy.backward(loss, self.actor, opt)
        strategy.optimizer_step(opt, self.actor, None, name="actor")

    def configure_optimizers(self):
        return self.trainer.strategy.create_optimizer(self.actor, lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), batch_size=2)


def fit(module: L.LightningModule, plugins=None) -> tuple[L.Trainer, Recorder]:
    recorder = Recorder()
    config = StrategyConfig(micro_train_batch_size=2, train_batch_size=2, max_norm=0.0)  # precision: the Trainer's
    trainer = L.Trainer(accelerator="cpu", strategy=LightRFTFake(config), max_steps=4, plugins=plugins,
                        callbacks=[recorder], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module)
    return trainer, recorder


def test_hooks_fire_for_the_lightrft_shape():
    module = LightRFTShape()
    _, recorder = fit(module)
    assert recorder.backward_losses == pytest.approx(module.raw_losses)
    assert len(recorder.after_backward_norms) == len(recorder.before_step_norms) == 4


def test_grad_scaler_scales_the_loss_and_unscales_before_the_step():
    module = LightRFTShape()
    trainer, recorder = fit(module, plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))])
    scale = 2.0**8
    assert recorder.backward_losses[0] == pytest.approx(module.raw_losses[0] * scale, rel=1e-3)
    # gradients are scaled after backward and unscaled when the optimizer hooks see them
    ratios = [a / b for a, b in zip(recorder.after_backward_norms, recorder.before_step_norms)]
    assert ratios == pytest.approx([scale] * 4, rel=1e-3)
    assert trainer.strategy.skipped_steps == 0


def test_an_overflow_skips_the_step_and_lowers_the_scale():
    module = LightRFTShape(poison_step=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer, _ = fit(module, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.strategy.skipped_steps == 1
    assert scaler.get_scale() == 2.0**7  # halved once by the overflow
    assert all(torch.isfinite(p).all() for p in module.actor.parameters())
