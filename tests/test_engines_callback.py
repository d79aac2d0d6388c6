"""RolloutEngineCallback in a real ``Trainer.fit`` with LightRFTFake: weights follow the actor,
the wake -> push -> wake KV -> generate -> sleep order holds for the HF, vLLM and SGLang engines."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from lightrft_lightning import LightRFTFake
from lightrft_lightning.callbacks import RolloutEngineCallback, find_rollout_callback
from lightrft_lightning.engines import HFEngine, SamplingParams, SGLangEngine, VLLMEngine
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.test_engines_adapters import FakeLLM, FakeSGLangEngine, fake_packages  # noqa: F401 (fixture)

PROMPTS = [[5, 6, 7], [9, 10, 11]]
PARAMS = SamplingParams(n=2, max_new_tokens=6, seed=0, stop_at_eos=False)


class RolloutModule(LightningModule):
    """Generates with the callback, then raises the log-prob of its own samples (so weights move)."""

    def __init__(self, shape: str = "auto", rollouts_per_step: int = 1) -> None:
        super().__init__()
        self.actor = tiny_causal_lm(seed=0)
        self.shape = shape
        self.automatic_optimization = shape == "auto"
        self.rollouts_per_step = rollouts_per_step
        self.rollouts: list[list[list[int]]] = []
        self.max_logit_diffs: list[float] = []
        self.registered: list[bool] = []

    def training_step(self, batch, batch_idx):
        callback = find_rollout_callback(self.trainer)
        for _ in range(self.rollouts_per_step):
            out = callback.generate(self, PROMPTS, PARAMS)
            self.rollouts.append([c.token_ids for c in out])
        self.registered.append(self.trainer.strategy.engines == [callback.engine])
        seqs = torch.tensor([PROMPTS[c.prompt_index] + c.token_ids for c in out])
        if isinstance(callback.engine, HFEngine) and callback.engine.weights_valid:  # level 2 dropped them
            with torch.no_grad():
                diff = callback.engine.model(seqs).logits - self.actor(seqs).logits
            self.max_logit_diffs.append(diff.abs().max().item())
        logits = self.actor(seqs).logits[:, len(PROMPTS[0]) - 1:-1]
        loss = -torch.log_softmax(logits, -1).gather(-1, seqs[:, len(PROMPTS[0]):, None]).mean()
        if self.shape == "auto":
            return loss
        if self.shape == "manual":
            opt = self.optimizers()
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
        else:  # the LightRFT call shape
            strategy = self.trainer.strategy
            if not hasattr(self, "lightrft_opt"):
                self.lightrft_opt = strategy.create_optimizer(self.actor, lr=2.0)
            strategy.backward(loss, self.actor, self.lightrft_opt)
            strategy.optimizer_step(self.lightrft_opt, self.actor, None)

    def configure_optimizers(self):
        return None if self.shape == "lightrft" else torch.optim.SGD(self.actor.parameters(), lr=2.0)

    def train_dataloader(self):
        return DataLoader(list(range(3)), batch_size=1)


def fit(module, callback, steps=3):
    strategy = LightRFTFake(config={"train_batch_size": 1, "micro_train_batch_size": 1, "max_norm": 0.0})
    trainer = Trainer(strategy=strategy, max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize("shape", ["auto", "manual", "lightrft"])
def test_hf_engine_follows_the_actor_every_step(shape):
    module, callback = RolloutModule(shape), RolloutEngineCallback(bucket_bytes=4096)
    trainer = fit(module, callback)
    assert callback.stats["pushes"] == 3  # the first fill, then once after each optimizer step
    assert max(module.max_logit_diffs) <= 1e-6
    assert module.rollouts[0] != module.rollouts[1] != module.rollouts[2]  # same seed, new weights
    assert all(module.registered) and trainer.strategy.engines == []
    assert trainer.callback_metrics["rollout/sync_bytes"] == sum(p.numel() * 4 for p in module.actor.parameters())


def test_no_push_without_an_optimizer_step_level_2_pushes_every_time():
    module, callback = RolloutModule("auto", rollouts_per_step=2), RolloutEngineCallback()
    fit(module, callback, steps=2)
    assert callback.stats["pushes"] == 2
    assert module.rollouts[0] == module.rollouts[1] and module.rollouts[2] == module.rollouts[3]

    module2, callback2 = RolloutModule("auto", rollouts_per_step=2), RolloutEngineCallback(sleep_level=2)
    fit(module2, callback2, steps=2)
    assert callback2.stats["pushes"] == 4  # level 2 dropped the weights after each rollout
    assert module2.rollouts == module.rollouts


def test_a_rollout_from_a_hook_that_cannot_log_still_runs():
    """``on_train_end`` (an evaluation after training, say) refuses ``self.log``: the rollout runs, with
    the final weights pushed, and its timings stay in ``stats`` only."""

    class FinalRollout(Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            self.out = find_rollout_callback(trainer).generate(pl_module, PROMPTS, PARAMS)

    module, callback, final = RolloutModule("auto"), RolloutEngineCallback(), FinalRollout()
    strategy = LightRFTFake(config={"train_batch_size": 1, "micro_train_batch_size": 1, "max_norm": 0.0})
    Trainer(strategy=strategy, max_steps=2, callbacks=[callback, final], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False).fit(module)
    assert callback.stats["pushes"] == 3 and len(final.out) == len(module.rollouts[-1])
    assert [c.token_ids for c in final.out] != module.rollouts[-1]  # the weights after the last step


def _cycle(push):
    return [("wake_up", ["weights"]), *push, ("wake_up", ["kv_cache"]), ("generate", 2), ("sleep", 1)]


@pytest.mark.usefixtures("fake_packages")
def test_vllm_call_order_in_fit():
    llm = FakeLLM("/m")
    module, callback = RolloutModule("manual", rollouts_per_step=2), RolloutEngineCallback(VLLMEngine(llm=llm), bucket_bytes=8192)
    fit(module, callback, steps=2)
    calls = [c if c[0] != "load_weights" else ("load_weights",) for c in llm.calls]
    loads = calls.count(("load_weights",)) // 2
    push = [("load_weights",)] * loads + [("reset_prefix_cache",)]
    assert loads == 1  # one reload per push (issue 29 risk 6)
    assert calls == [("sleep", 1)] + (_cycle(push) + _cycle([])) * 2
    assert all(module.registered)


@pytest.mark.usefixtures("fake_packages")
def test_sglang_call_order_in_fit():
    sgl = FakeSGLangEngine("/m")
    module, callback = RolloutModule("lightrft"), RolloutEngineCallback(SGLangEngine(engine=sgl), bucket_bytes=8192)
    fit(module, callback, steps=2)
    updates = [c for c in sgl.calls if c[0] == "update_weights_from_tensor"]
    per_push = len(updates) // 2
    push = [("update_weights_from_tensor", c[1], c[2]) for c in updates[:per_push]]
    assert [c[2] for c in push] == [False] * (per_push - 1) + [True]
    cycle = [("resume_memory_occupation", ["weights"]), *push, ("resume_memory_occupation", ["kv_cache", "cuda_graph"]),
             ("generate", 4), ("release_memory_occupation", None)]
    assert sgl.calls == [("release_memory_occupation", None)] + cycle * 2


@pytest.mark.usefixtures("fake_packages")
def test_strategy_engines_sleep_and_wake_reach_the_engine():
    llm = FakeLLM("/m")
    callback = RolloutEngineCallback(VLLMEngine(llm=llm))

    class Probe(RolloutModule):
        def training_step(self, batch, batch_idx):
            self.trainer.strategy.engines_wake_up()
            self.trainer.strategy.engines_sleep()
            return super().training_step(batch, batch_idx)

    fit(Probe("auto"), callback, steps=1)
    assert llm.calls[:3] == [("sleep", 1), ("wake_up", ["weights", "kv_cache"]), ("sleep", 1)]


def test_errors_are_clear():
    module = RolloutModule("auto")
    trainer = Trainer(logger=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="no RolloutEngineCallback"):
        find_rollout_callback(trainer)
    with pytest.raises(RuntimeError, match="inside Trainer.fit"):
        RolloutEngineCallback().generate(module, PROMPTS, PARAMS)
    with pytest.raises(ValueError, match="sleep_level=0"):
        RolloutEngineCallback(sleep_level=0)
    with pytest.raises(ValueError, match="actor_attr='policy'"):
        RolloutEngineCallback(actor_attr="policy")._actor(module)
