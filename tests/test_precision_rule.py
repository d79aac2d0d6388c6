"""One precision rule on every backend: under a Trainer its ``precision`` decides; a strategy config that
moves ``bf16``/``fp16`` away from LightRFT's defaults (asks for fp32 or fp16) against a Trainer that trains
otherwise is refused the same way by all three strategies, and a config at the defaults follows the Trainer."""

from __future__ import annotations

import argparse

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


def test_a_config_names_its_precision():
    assert StrategyConfig().precision == "bf16" and StrategyConfig(bf16=False).precision == "fp32"
    assert StrategyConfig(bf16=False, fp16=True).precision == "fp16"
    assert StrategyConfig.from_args(argparse.Namespace(bf16=False)).precision == "fp32"  # LightRFT's args default


REFUSED = (r"{}: Trainer\(precision='bf16-mixed'\) trains in bf16, but the strategy's config says fp32 "
           r"\(StrategyConfig.bf16=False, fp16=False\); accepted: the same precision in both")


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_config_given_another_precision_is_refused_on_every_backend(name):
    # the Trainer hands its precision to the strategy when it is built; setup asks this same question
    strategy = STRATEGIES[name](StrategyConfig(bf16=False, train_batch_size=2, micro_train_batch_size=2))
    with pytest.raises(ValueError, match=REFUSED.format(STRATEGIES[name].__name__)):
        trainer(strategy, "bf16-mixed").strategy.training_precision()
    fp16 = STRATEGIES[name](StrategyConfig(bf16=False, fp16=True, train_batch_size=2, micro_train_batch_size=2))
    with pytest.raises(ValueError, match=r"trains in fp32, but the strategy's config says fp16"):
        trainer(fp16, "32-true").strategy.training_precision()


def test_the_refusal_happens_at_setup():
    strategy = LightRFTFake(StrategyConfig(bf16=False, train_batch_size=2, micro_train_batch_size=2))
    with pytest.raises(ValueError, match=REFUSED.format("LightRFTFake")):
        trainer(strategy, "bf16-mixed").fit(Regression())


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_config_at_the_defaults_follows_the_trainer(name):
    strategy = STRATEGIES[name](StrategyConfig(train_batch_size=2, micro_train_batch_size=2))
    assert strategy.training_precision() == ("fp32" if name == "fake" else "bf16")  # standalone: the config (fake: fp32)
    assert trainer(strategy, "32-true").strategy.training_precision() == "fp32"
    assert trainer(STRATEGIES[name](StrategyConfig(train_batch_size=2)), "bf16-mixed").strategy.training_precision() == "bf16"
