"""LightRFTFake under Lightning's Trainer: manual optimization with two models and two optimizers."""

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightrft_lightning import LightRFTFake, StrategyConfig


class ActorCritic(pl.LightningModule):
    """Actor and critic regress the same target; the LightRFT or the Lightning call shape steps them."""

    def __init__(self, lightrft_shape: bool = True):
        super().__init__()
        self.automatic_optimization = False
        self.lightrft_shape = lightrft_shape
        torch.manual_seed(0)
        self.actor = torch.nn.Linear(4, 1)
        self.critic = torch.nn.Linear(4, 1)
        self.losses = []
        self.grad_norms = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        actor_opt, critic_opt = self.optimizers()
        strategy = self.trainer.strategy
        for name, model, opt in (("actor", self.actor, actor_opt), ("critic", self.critic, critic_opt)):
            loss = torch.nn.functional.mse_loss(model(x), y)
            if self.lightrft_shape:
                strategy.backward(loss, model, opt)
                strategy.optimizer_step(opt, model, None, name=name)
            else:
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            self.losses.append(loss.item())
        self.log("actor_loss", self.losses[-2])
        self.grad_norms.append(strategy.stepper(self.actor).grad_norm)

    def configure_optimizers(self):
        return torch.optim.SGD(self.actor.parameters(), lr=0.1), torch.optim.SGD(self.critic.parameters(), lr=0.1)


def data(n=24):  # 6 batches: a checkpoint after 6 steps ends an epoch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def trainer(tmp_path, strategy, **kwargs):
    return pl.Trainer(accelerator="cpu", strategy=strategy, max_steps=kwargs.pop("max_steps", 6),
                      logger=kwargs.pop("logger", False), enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **kwargs)


@pytest.mark.parametrize("lightrft_shape", [True, False])
def test_global_step_counts_training_steps(tmp_path, lightrft_shape):
    module = ActorCritic(lightrft_shape)
    t = trainer(tmp_path, LightRFTFake(StrategyConfig(train_batch_size=1)), enable_checkpointing=False)
    t.fit(module, data())
    assert t.global_step == 6  # 6 training steps, 12 optimizer steps (Lightning #17958 would stop at 3)
    assert len(module.losses) == 12
    assert module.losses[-2] < module.losses[0]


def test_grad_norm_reaches_the_logger_every_n_steps(tmp_path):
    module = ActorCritic()
    t = trainer(tmp_path, LightRFTFake(StrategyConfig(train_batch_size=1)), enable_checkpointing=False,
                logger=CSVLogger(tmp_path), log_every_n_steps=2)
    t.fit(module, data())
    with open(t.logger.experiment.metrics_file_path) as f:
        rows = [row for row in csv.DictReader(f) if row["actor/grad_norm"]]
    assert [int(row["step"]) for row in rows] == [1, 3, 5]  # steps 2, 4 and 6, counted from 0
    for row in rows:
        assert float(row["actor/grad_norm"]) == pytest.approx(module.grad_norms[int(row["step"])], rel=1e-6)
        assert float(row["critic/grad_norm"]) > 0 and float(row["critic/skipped_steps"]) == 0.0


def test_registered_name_and_resume(tmp_path):
    module = ActorCritic()
    t = trainer(tmp_path, "lightrft_fake", enable_checkpointing=False, max_steps=-1, max_epochs=1)
    assert isinstance(t.strategy, LightRFTFake)
    t.strategy.config.train_batch_size = 1
    t.fit(module, data())
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)

    straight = ActorCritic()
    t1 = trainer(tmp_path / "a", LightRFTFake({"train_batch_size": 1}), enable_checkpointing=False, max_steps=-1, max_epochs=2)
    t1.fit(straight, data())

    resumed = ActorCritic()
    t2 = trainer(tmp_path / "b", LightRFTFake({"train_batch_size": 1}), enable_checkpointing=False, max_steps=-1, max_epochs=2)
    t2.fit(resumed, data(), ckpt_path=ckpt)
    assert t1.global_step == t2.global_step == 12
    assert resumed.losses == straight.losses[12:]
    assert torch.equal(resumed.actor.weight, straight.actor.weight)
    assert torch.equal(resumed.critic.bias, straight.critic.bias)
