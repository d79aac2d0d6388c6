"""The one engine builder (``engines.build``) and the one sleep/wake path (``engines.sleep``): the
defaults and the dtype rule every caller gets, the standalone LightRFT path's engine dtype under bf16
(it once read FSDP2's fp32 master dtype), and the callback and the strategy calls reaching the same path."""

from __future__ import annotations

import argparse
import sys
import types

import pytest
import torch
from lightning.pytorch import Trainer

from lightrft_lightning import LightRFTFake, StrategyConfig
from lightrft_lightning.callbacks import RolloutEngineCallback
from lightrft_lightning.engines import HFEngine, SGLangEngine, VLLMEngine
from lightrft_lightning.engines.build import DEFAULT_BUCKET_BYTES, EngineConfig, engine_config, generation_dtype
from lightrft_lightning.strategies.deepspeed import LightRFTDeepSpeed
from lightrft_lightning.strategies.fsdp import LightRFTFSDP
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.test_engines_callback import RolloutModule


def fit(module: RolloutModule, callback: RolloutEngineCallback, steps: int, config: dict) -> None:
    strategy = LightRFTFake(config={"train_batch_size": 1, "micro_train_batch_size": 1, "max_norm": 0.0, **config})
    Trainer(strategy=strategy, max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False).fit(module)


def test_generation_dtype_follows_the_training_precision():
    assert generation_dtype("bf16-mixed") == generation_dtype("bf16-true") == torch.bfloat16
    assert generation_dtype("16-mixed") == torch.float16
    assert generation_dtype("32-true") is None  # the actor's own dtype


def test_engine_config_one_set_of_defaults():
    cfg = engine_config(None, "32-true")
    assert cfg == EngineConfig(engine_type="hf", dtype=None, tp_size=1, mem_util=0.5, sleep_level=1, seed=42,
                               bucket_bytes=DEFAULT_BUCKET_BYTES) and DEFAULT_BUCKET_BYTES == 256 << 20
    assert engine_config(StrategyConfig(engine_sleep_level=2), "bf16-mixed").sleep_level == 2
    # issue 29 risk 5: vLLM/SGLang weights are pushed before each rollout after a step: level 2 by default
    assert engine_config(StrategyConfig(engine_type="vllm"), "32-true").sleep_level == 2
    assert engine_config(StrategyConfig(engine_type="sglang"), "32-true").sleep_level == 2
    assert engine_config(StrategyConfig(engine_type="vllm", engine_sleep_level=1), "32-true").sleep_level == 1
    assert engine_config(StrategyConfig(enable_engine_sleep=False), "32-true").sleep_level is None  # stays awake
    assert engine_config(StrategyConfig(), "32-true", sleep_level=2).sleep_level == 2  # over the config's default
    with pytest.raises(ValueError, match=r"sleep_level=1 disagrees with StrategyConfig.engine_sleep_level=2"):
        engine_config(StrategyConfig(engine_sleep_level=2), "32-true", sleep_level=1)
    with pytest.raises(ValueError, match=r"sleep_level=2 would be ignored: StrategyConfig.enable_engine_sleep=False"):
        engine_config(StrategyConfig(enable_engine_sleep=False), "32-true", sleep_level=2)
    with pytest.raises(ValueError, match=r"engine_kwargs=\{'enforce_eager': True\} would be ignored"):
        engine_config(None, "32-true", engine_kwargs={"enforce_eager": True})
    with pytest.raises(ValueError, match=r"bucket_bytes=0 is invalid; accepted: an integer >= 1"):
        engine_config(None, "32-true", bucket_bytes=0)


class Recording:
    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs


@pytest.fixture
def hf_dir(tmp_path):
    tiny_causal_lm(seed=1).save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("strategy_class,bf16,expected", [
    (LightRFTFSDP, True, torch.bfloat16), (LightRFTFSDP, False, torch.float32),
    (LightRFTDeepSpeed, True, torch.bfloat16), (LightRFTFake, True, torch.float32),  # the fake trains in fp32
])
def test_standalone_engine_dtype_follows_the_training_precision(strategy_class, bf16, expected, hf_dir, monkeypatch):
    """Issue 29 risk 7: standalone, the engine's dtype came from the actor's parameters, which under
    FSDP2 are the fp32 master weights whatever ``bf16`` says; now it is the precision the actor trains in."""
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=Recording))
    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=Recording))
    args = argparse.Namespace(bf16=bf16, pretrain=hf_dir, fsdp=strategy_class is LightRFTFSDP, enable_engine_sleep=False)
    strategy = strategy_class(args=args)
    actor = tiny_causal_lm(seed=1)  # fp32 parameters, as FSDP2 keeps them under bf16-mixed
    hf = strategy.setup_inference_engine(args, "hf", actor)
    assert isinstance(hf, HFEngine) and hf.dtype == expected and hf.weights_valid
    vllm = strategy.setup_inference_engine(args, "vllm", actor=None)
    assert isinstance(vllm, VLLMEngine) and vllm.llm.kwargs["dtype"] == ("auto" if expected == torch.float32 else "bfloat16")
    sglang = strategy.setup_inference_engine(args, "sglang", actor=None)
    assert isinstance(sglang, SGLangEngine) and sglang.engine.kwargs["dtype"] == vllm.llm.kwargs["dtype"]


def test_callback_follows_the_strategy_config_sleep_settings():
    """The callback's sleep level comes from the StrategyConfig (one set of defaults), through the one
    sleep path: level 2 pushes before every rollout; enable_engine_sleep=False keeps the engine awake."""
    level2 = RolloutEngineCallback()
    fit(RolloutModule("auto", rollouts_per_step=2), level2, steps=2, config={"engine_sleep_level": 2})
    assert level2.engine_config.sleep_level == 2 and level2.stats["pushes"] == 4

    awake = RolloutEngineCallback()
    fit(RolloutModule("auto", rollouts_per_step=2), awake, steps=2, config={"enable_engine_sleep": False})
    assert awake.engine_config.sleep_level is None and awake.stats["pushes"] == 2 and awake.stats["sleep_s"] < 1e-3
    with pytest.raises(ValueError, match=r"sleep_level=2 would be ignored"):
        fit(RolloutModule("auto"), RolloutEngineCallback(sleep_level=2), steps=1, config={"enable_engine_sleep": False})
