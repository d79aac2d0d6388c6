"""The device-memory budget of a colocated vLLM/SGLang engine (issue 29, risk 2): the arithmetic, and
where the callback applies it (at build, counting the optimizer state the first step allocates, and
before every wake). ``torch.cuda.mem_get_info`` cannot run here: ``device_memory`` is replaced by the
numbers it would give; the engines are the recording fakes of tests/test_engines_adapters.py."""

from __future__ import annotations

import pytest
import torch

from lightrft_lightning.callbacks import RolloutEngineCallback
from lightrft_lightning.engines import VLLMEngine, memory
from lightrft_lightning.engines.memory import DeviceMemory, check_engine_fits, check_wake_fits, pending_optimizer_bytes
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.test_engines_adapters import FakeLLM, fake_packages  # noqa: F401 (fixture)
from tests.test_engines_callback import RolloutModule, fit

GiB = 1 << 30


def test_adam_state_is_pending_until_the_first_step():
    model = tiny_causal_lm(seed=0)
    params = sum(p.numel() * 4 for p in model.parameters())
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert pending_optimizer_bytes([adam, torch.optim.SGD(model.parameters(), lr=0.1)]) == 2 * params
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    adam.step()
    assert pending_optimizer_bytes([adam]) == 0  # allocated now: counted in the free memory


def test_an_engine_that_fits_now_but_not_after_the_first_step_is_refused_with_the_value_that_fits():
    h200 = DeviceMemory(free=100 * GiB, total=140 * GiB)
    assert check_engine_fits(0.5, h200) == 70 * GiB  # vLLM's start check: ceil(0.5 x total) free
    with pytest.raises(ValueError, match=r"engine_mem_util=0.5 .* 70.0 GiB .* 100.0 GiB are free less 40.0 GiB of "
                                         r"optimizer state.*engine_mem_util <= 0.42"):
        check_engine_fits(0.5, h200, pending_bytes=40 * GiB)  # (100 - 40) / 140 = 0.428...
    with pytest.raises(ValueError, match=r"engine_mem_util <= 0.71"):
        check_engine_fits(0.9, h200)
    check_wake_fits(70 * GiB, DeviceMemory(70 * GiB, 140 * GiB), 0.5)
    check_wake_fits(70 * GiB, None, 0.5)  # no CUDA: nothing to check
    with pytest.raises(RuntimeError, match=r"needs 70.0 GiB to wake .*engine_mem_util=0.5.* 69.0 GiB are free.*<= 0.49"):
        check_wake_fits(70 * GiB, DeviceMemory(69 * GiB, 140 * GiB), 0.5)


class AdamModule(RolloutModule):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.actor.parameters(), lr=1e-3)


@pytest.mark.usefixtures("fake_packages")
def test_the_callback_builds_a_vllm_engine_only_when_it_fits_beside_the_first_steps_optimizer_state(tmp_path, monkeypatch):
    module = AdamModule("auto")
    module.actor.config.name_or_path = str(tmp_path)  # a local directory for the (fake) vLLM to load
    pending = 2 * sum(p.numel() * 4 for p in module.actor.parameters())
    total = 1 * GiB
    # room for the engine's half of the device now, not once the first step allocates Adam's state
    monkeypatch.setattr(memory, "device_memory", lambda device=None: DeviceMemory(total // 2 + pending // 2, total))
    callback = RolloutEngineCallback()
    from lightrft_lightning import LightRFTFake
    from lightning.pytorch import Trainer

    strategy = LightRFTFake(config={"train_batch_size": 1, "micro_train_batch_size": 1, "engine_type": "vllm"})
    trainer = Trainer(strategy=strategy, max_steps=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="StrategyConfig.engine_mem_util=0.5 .* of optimizer state"):
        trainer.fit(module)
    monkeypatch.setattr(memory, "device_memory", lambda device=None: DeviceMemory(total // 2 + pending, total))
    module2 = AdamModule("auto")
    module2.actor.config.name_or_path = str(tmp_path)
    callback2 = RolloutEngineCallback()
    Trainer(strategy=LightRFTFake(config={"train_batch_size": 1, "micro_train_batch_size": 1, "engine_type": "vllm"}),
            max_steps=1, callbacks=[callback2], logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False).fit(module2)
    assert callback2.stats["pushes"] == 1  # built, filled and generated from


@pytest.mark.usefixtures("fake_packages")
def test_a_wake_without_room_for_the_engine_is_refused_before_vllm_maps_memory(monkeypatch):
    total = 1 * GiB
    monkeypatch.setattr(memory, "device_memory", lambda device=None: DeviceMemory(total // 2 - 1, total))
    llm = FakeLLM("/m")
    with pytest.raises(RuntimeError, match=r"needs 0.5 GiB to wake \(StrategyConfig.engine_mem_util=0.5"):
        fit(RolloutModule("manual"), RolloutEngineCallback(VLLMEngine(llm=llm)), steps=1)
    assert ("wake_up", ["weights"]) not in llm.calls  # refused before the engine mapped anything
    monkeypatch.setattr(memory, "device_memory", lambda device=None: DeviceMemory(total // 2, total))
    llm = FakeLLM("/m")
    fit(RolloutModule("manual"), RolloutEngineCallback(VLLMEngine(llm=llm)), steps=1)
    assert llm.calls[:2] == [("sleep", 1), ("wake_up", ["weights"])]
