"""DCPCheckpoint with LightRFTFake in a real Trainer: DCP directories, atomic ``latest``,
rotation that spares the resumed checkpoint, automatic bitwise-exact resume, async save."""

from __future__ import annotations


import lightning.pytorch as pl
import pytest
import torch

from lightrft_lightning import LightRFTFake, checkpoint
from lightrft_lightning.callbacks.dcp_checkpoint import DCPCheckpoint
from tests.scripts.ckpt_common import LossRecorder, NoisyLM, max_diff, params, prompts

CONFIG = {"train_batch_size": 2, "micro_train_batch_size": 1, "bf16": False, "max_norm": 1.0}


def fit(max_steps: int, callbacks: list, seed: int = 0, **module_kwargs):
    pl.seed_everything(123, verbose=False)
    module = NoisyLM(seed=seed, **module_kwargs)
    recorder = LossRecorder()
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(CONFIG), max_steps=max_steps, logger=False,
                         enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[recorder, *callbacks])
    trainer.fit(module, prompts())
    return trainer, module, recorder.losses


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_resume_is_bitwise_exact(tmp_path, async_save):
    _, straight, straight_losses = fit(6, [DCPCheckpoint(tmp_path / "a", every_n_train_steps=2, async_save=async_save)])
    trainer, _, first = fit(3, [DCPCheckpoint(tmp_path / "b", every_n_train_steps=2, async_save=async_save)])
    assert first == straight_losses[:3]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["global_step2", "global_step3", "latest"]
    assert (tmp_path / "b" / "global_step3" / ".metadata").is_file()  # a DCP directory
    # a fresh run with other initial weights resumes from latest = step 3 and trains steps 4..6
    callback = DCPCheckpoint(tmp_path / "b", every_n_train_steps=2, async_save=async_save)
    trainer, resumed, second = fit(6, [callback], seed=99)
    assert callback.resumed_from == "global_step3"
    assert second == straight_losses[3:]
    assert max_diff(params(resumed), params(straight)) == 0.0
    strategy = trainer.strategy
    assert strategy.stepper(resumed.actor).steps == 6 and strategy.stepper(resumed.actor).micro_steps == 12
    assert resumed.scheduler.last_epoch == 6


def test_latest_and_rotation_spare_the_resumed_checkpoint(tmp_path):
    fit(2, [DCPCheckpoint(tmp_path, every_n_train_steps=1, max_num=5)])
    assert checkpoint.read_latest(tmp_path) == "global_step2"
    callback = DCPCheckpoint(tmp_path, every_n_train_steps=1, max_num=2)
    fit(6, [callback])
    tags = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    # at most 2 checkpoints, one of them the checkpoint this run resumed from
    assert tags == ["global_step2", "global_step6", "latest"]
    assert checkpoint.read_latest(tmp_path) == "global_step6"
    assert not list(tmp_path.glob(".tmp-*"))


def test_resume_opt_out(tmp_path):
    _, _, base = fit(2, [DCPCheckpoint(tmp_path, every_n_train_steps=2)])
    callback = DCPCheckpoint(tmp_path, resume=False)
    _, _, fresh = fit(2, [callback])
    assert fresh == base and callback.resumed_from is None  # trained from scratch again


def test_max_mem_rotation(tmp_path):
    fit(3, [DCPCheckpoint(tmp_path, every_n_train_steps=1, max_num=10, max_mem=1e-9)])
    tags = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert tags == ["global_step3", "latest"]  # only the newest survives a tiny budget


def test_nonfinite_loss_is_skipped_counted_and_logged(tmp_path, caplog):
    trainer, module, losses = fit(4, [], nonfinite_at=(1,))
    state = trainer.strategy.stepper(module.actor)
    assert state.skipped_steps == 1 and state.steps == 3
    assert "step skipped" in caplog.text
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert trainer.callback_metrics["actor/skipped_steps"] == 1.0


def fit_grpo(max_steps: int, dirpath, seed: int = 0):
    from lightrft_lightning.algorithms import GRPO
    from lightrft_lightning.data import PromptDataModule
    from lightrft_lightning.tasks import counting_prompts

    pl.seed_everything(seed, verbose=False)
    model = GRPO(tokenizer_chars="0123456789", model_config={"hidden_size": 32}, n_samples_per_prompt=2,
                 max_new_tokens=4, temperature=1.0, micro_train_batch_size=4, actor_learning_rate=1e-2, kl_coef=0.05)
    data = PromptDataModule(prompts=counting_prompts(32, seed=3), batch_size=4)
    recorder = LossRecorder()
    callback = DCPCheckpoint(dirpath, every_n_train_steps=2)
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake({"bf16": False}), max_steps=max_steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[recorder, callback])
    recorder.key = "reward"
    trainer.fit(model, data)
    return model, recorder.losses, callback


def test_grpo_with_sampling_resumes_exactly(tmp_path):
    straight, straight_metrics, _ = fit_grpo(4, tmp_path / "a")
    fit_grpo(2, tmp_path / "b")
    resumed, metrics, callback = fit_grpo(4, tmp_path / "b", seed=7)  # other seed: everything comes from the checkpoint
    assert callback.resumed_from == "global_step2"
    assert metrics == straight_metrics[2:]
    assert max_diff(params(resumed.actor), params(straight.actor)) == 0.0


def test_resume_from_the_last_batch_of_an_epoch_is_bitwise_exact(tmp_path):
    """4 prompts in batches of 2: step 2 ends epoch 0, so the resumed run starts a new epoch, whose
    DataLoader iterator draws from the torch RNG before the first batch."""
    def fit_small(max_steps, callbacks, seed=0):
        pl.seed_everything(123, verbose=False)
        module, recorder = NoisyLM(seed=seed), LossRecorder()
        trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(CONFIG), max_steps=max_steps, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder, *callbacks])
        trainer.fit(module, prompts(4))
        return module, recorder.losses

    straight, straight_losses = fit_small(4, [DCPCheckpoint(tmp_path / "a", every_n_train_steps=2)])
    fit_small(2, [DCPCheckpoint(tmp_path / "b", every_n_train_steps=2)])
    resumed, second = fit_small(4, [DCPCheckpoint(tmp_path / "b", every_n_train_steps=2)], seed=99)
    assert second == straight_losses[2:]
    assert max_diff(params(resumed), params(straight)) == 0.0
