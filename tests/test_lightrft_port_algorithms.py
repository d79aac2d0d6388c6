"""The algorithms behind the StrategyConfig fields LightRFT's trainers read (reward clip, running
reward normalization, DAPO's overlong penalty and dynamic sampling, advantage normalization and clip)
and LightRFT's advantage estimator names, in GRPO/PPO."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightrft_lightning import LightRFTFake, StrategyConfig
from lightrft_lightning.algorithms import GRPO, PPO
from lightrft_lightning.algorithms.advantages import (RunningMoments, compute_advantages,
                                                      normalize_and_clip, overlong_penalty, tied_groups)
from lightrft_lightning.algorithms.experience import Experience
from lightrft_lightning.data import PromptDataModule
from lightrft_lightning.tasks import counting_prompts

torch.set_num_threads(1)
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
REWARDS = torch.tensor([1.0, 0.0, 2.0, 2.0])


def test_lightrft_estimator_names():
    grpo, _ = compute_advantages("grpo", REWARDS, MASK, 2)
    assert torch.equal(grpo, compute_advantages("group_norm", REWARDS, MASK, 2)[0])
    # reinforce: the returns to go of the reward on the last response token, not whitened
    adv, ret = compute_advantages("reinforce", REWARDS, MASK, 2)
    assert torch.equal(adv, REWARDS[:, None] * MASK) and torch.equal(adv, ret)
    # reinforce_baseline: minus the group mean first
    adv, _ = compute_advantages("reinforce_baseline", REWARDS, MASK, 2)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, 0.0, 0.0])[:, None] * MASK)
    # cpgd: group z-scores with the population std, from the reward before any KL
    adv, _ = compute_advantages("cpgd", torch.tensor([1.0, 3.0, 0.0, 4.0]), MASK, 2)
    assert torch.allclose(adv[:, 0], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5)
    with pytest.raises(ValueError, match="cpgd"):
        compute_advantages("cpgd", REWARDS, MASK, 2, kl=torch.ones_like(MASK), kl_coef=0.1)
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        compute_advantages("reinforce_baseline", REWARDS, MASK, 1)
    for name in ("grpo", "reinforce", "reinforce_baseline", "cpgd"):
        assert name in GRPO.advantage_estimators


def test_shaping_functions():
    pen = overlong_penalty(torch.tensor([5, 6, 8, 10]), max_new_tokens=10, buffer_len=4, factor=2.0)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -1.0, -2.0]))
    moments, seen = RunningMoments(), []
    for batch in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0]), torch.tensor([-4.0, 0.5])):
        moments.update(batch)
        seen.append(batch)
    everything = torch.cat(seen).double()
    assert moments.count == 6 and moments.mean == pytest.approx(everything.mean().item())
    assert moments.var == pytest.approx(everything.var(unbiased=False).item())
    assert torch.equal(tied_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2), torch.tensor([True, True, False, False]))
    adv = torch.tensor([[3.0, -0.5], [0.2, -4.0]])
    out, frac = normalize_and_clip(adv, torch.ones_like(adv), norm=False, clip=1.0)
    assert torch.equal(out, torch.tensor([[1.0, -0.5], [0.2, -1.0]])) and frac.item() == 0.5
    out, _ = normalize_and_clip(adv, torch.ones_like(adv), norm=True, clip=0.0)
    assert abs(out.mean().item()) < 1e-6 and out.std().item() == pytest.approx(1.0, rel=1e-4)


def tiny(**kwargs):
    defaults = dict(tokenizer_chars="0123456789", model_config={"hidden_size": 32, "intermediate_size": 64},
                    n_samples_per_prompt=4, max_new_tokens=4, micro_train_batch_size=16, actor_learning_rate=1e-3)
    return GRPO(**{**defaults, **kwargs})


class Keep(Callback):
    def __init__(self):
        self.metrics = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(module, steps=2, config=None):
    keep = Keep()
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(config), max_steps=steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[keep])
    trainer.fit(module, PromptDataModule(prompts=counting_prompts(64, seed=0), batch_size=4))
    return trainer, keep


def test_grpo_runs_every_shaping_setting_and_writes_them_to_the_config():
    pl.seed_everything(0, verbose=False)
    settings = dict(reward_clip=0.8, reward_running_norm=True, reward_running_norm_minus_mean=True,
                    advantages_norm=True, advantage_clip=0.5, overlong_buffer=True, overlong_buffer_len=2,
                    overlong_buffer_penalty_factor=0.5, dynamic_sampling=True, advantage_estimator="reinforce_baseline")
    module = tiny(**settings)
    trainer, keep = fit(module)
    config = trainer.strategy.config
    for name, value in settings.items():
        assert getattr(config, name) == value, name  # what LightRFT's trainers read as strategy.config.X
    last = keep.metrics[-1]
    # every response has max_new_tokens=4 > 4 - 2 tokens unless it stopped early: the penalty is in [-0.5, 0]
    assert -0.5 <= last["overlong/penalty"] <= 0.0
    assert 0.0 <= last["dynamic_sampling/kept"] <= 1.0 and 0.0 <= last["advantage_clip_frac"] <= 1.0
    assert -0.8 <= last["reward_shaped"] <= 0.8
    assert module.advantages.moments.count == 2 * 16  # every reward of both steps (4 prompts x 4 samples)
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    restored = tiny(**settings)
    restored.on_load_checkpoint(ckpt)
    assert restored.advantages.moments.state_dict() == module.advantages.moments.state_dict()


def test_dynamic_sampling_masks_tied_groups_out_of_the_loss():
    module = tiny(dynamic_sampling=True, n_samples_per_prompt=2)
    exp = Experience(torch.zeros(4, 4, dtype=torch.long), torch.ones(4, 4), MASK.clone())
    exp.advantages = torch.ones_like(MASK)
    metrics = {}
    module.advantages.shape_advantages(exp, torch.tensor([1.0, 1.0, 0.0, 1.0]), 2, metrics)
    assert torch.equal(exp.action_mask[:2], torch.zeros(2, 3)) and torch.equal(exp.action_mask[2:], MASK[2:])
    assert torch.equal(exp.advantages[:2], torch.zeros(2, 3)) and metrics["dynamic_sampling/kept"] == 0.5


def test_config_value_the_module_does_not_use_is_refused():
    with pytest.raises(ValueError, match="StrategyConfig.advantage_clip=0.5"):
        fit(tiny(), steps=1, config=StrategyConfig(advantage_clip=0.5))
    with pytest.raises(ValueError, match="StrategyConfig.advantage_estimator='rloo'"):
        fit(tiny(), steps=1, config=StrategyConfig(advantage_estimator="rloo"))


@pytest.mark.parametrize("kwargs,word", [
    ({"overlong_buffer_len": 2}, "only used with overlong_buffer=True"),
    ({"overlong_buffer": True, "overlong_buffer_len": 5}, "overlong_buffer_len=5"),
    ({"dynamic_sampling": True, "n_samples_per_prompt": 1, "advantage_estimator": "reinforce++"}, "dynamic_sampling"),
    ({"reward_running_norm_minus_mean": True}, "reward_running_norm=True"),
    ({"advantage_clip": -1.0}, "advantage_clip"),
    ({"advantages_norm": 1}, "advantages_norm"),
    ({"advantage_estimator": "cpgd", "kl_coef": 0.1, "kl_in_reward": True}, "cpgd"),
])
def test_bad_shaping_settings_are_refused(kwargs, word):
    with pytest.raises(ValueError, match=word):
        tiny(**kwargs)


def test_ppo_whitens_by_default_and_takes_the_shaping_settings():
    ppo = PPO(tokenizer_chars="0123456789", model_config={"hidden_size": 32, "intermediate_size": 64},
              max_new_tokens=4, micro_train_batch_size=4, reward_clip=1.0)
    assert ppo.hparams.advantages_norm is True and ppo.hparams.reward_clip == 1.0
    with pytest.raises(ValueError, match="dynamic_sampling"):
        PPO(tokenizer_chars="0123456789", model_config={"hidden_size": 32, "intermediate_size": 64},
            dynamic_sampling=True)
