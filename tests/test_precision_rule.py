"""One precision rule on every backend: under a Trainer its ``precision`` decides; a strategy config that
was given ``bf16``/``fp16`` values that disagree is refused the same way by all three strategies, and a
config that leaves them at LightRFT's defaults follows the Trainer."""

from __future__ import annotations

import argparse
import dataclasses

import lightning as L
import pytest
import torch

from lightrft_lightning import LightRFTDeepSpeed, LightRFTFake, LightRFTFSDP, StrategyConfig

STRATEGIES = {"fake": LightRFTFake, "fsdp": LightRFTFSDP, "deepspeed": LightRFTDeepSpeed}


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=2)


def trainer(strategy, precision: str) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, strategy=strategy, precision=precision, max_steps=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def test_which_precision_a_config_was_given():
    assert not StrategyConfig()._precision_given and StrategyConfig().precision == "bf16"
    assert StrategyConfig(bf16=True)._precision_given and StrategyConfig(bf16=False).precision == "fp32"
    assert not dataclasses.replace(StrategyConfig(), seed=1)._precision_given
    assert dataclasses.replace(StrategyConfig(fp16=True, bf16=False), seed=1)._precision_given
    assert StrategyConfig.from_args(argparse.Namespace(bf16=False))._precision_given
    assert not LightRFTFSDP(train_batch_size=1).config._precision_given and LightRFTFSDP(bf16=True).config._precision_given


REFUSED = (r"{}: Trainer\(precision='32-true'\) trains in fp32, but the strategy's config says bf16 "
           r"\(StrategyConfig.bf16=True, fp16=False\); accepted: the same precision in both")


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_config_given_another_precision_is_refused_on_every_backend(name):
    # the Trainer hands its precision to the strategy when it is built; setup asks this same question
    strategy = STRATEGIES[name](StrategyConfig(bf16=True, train_batch_size=2, micro_train_batch_size=2))
    with pytest.raises(ValueError, match=REFUSED.format(STRATEGIES[name].__name__)):
        trainer(strategy, "32-true").strategy.training_precision()


def test_the_refusal_happens_at_setup():
    strategy = LightRFTFake(StrategyConfig(bf16=True, train_batch_size=2, micro_train_batch_size=2))
    with pytest.raises(ValueError, match=REFUSED.format("LightRFTFake")):
        trainer(strategy, "32-true").fit(Regression())


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_config_at_the_defaults_follows_the_trainer(name):
    strategy = STRATEGIES[name](StrategyConfig(train_batch_size=2, micro_train_batch_size=2))
    assert strategy.training_precision() == ("fp32" if name == "fake" else "bf16")  # standalone: the config (fake: fp32)
    assert trainer(strategy, "32-true").strategy.training_precision() == "fp32"
    assert trainer(STRATEGIES[name](StrategyConfig(train_batch_size=2)), "bf16-mixed").strategy.training_precision() == "bf16"
