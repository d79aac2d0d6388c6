"""Rollout engines: the interface, the built-in ``HFEngine``, the vLLM and SGLang adapters (their
packages import only when an adapter is built), the one builder (``build``), the one sleep/wake path
(``sleep``) and bucketed weight streaming."""

from lightrft_lightning.engines.base import Completion, EngineStateError, LifecycleEngine, RolloutEngine, SamplingParams
from lightrft_lightning.engines.build import EngineConfig, build_engine, engine_config
from lightrft_lightning.engines.hf import HFEngine
from lightrft_lightning.engines.sglang import SGLangEngine
from lightrft_lightning.engines.sleep import sleep_engines, wake_engines
from lightrft_lightning.engines.vllm import VLLMEngine
from lightrft_lightning.engines.weight_sync import iter_weight_buckets, push_weights

__all__ = [
    "RolloutEngine", "LifecycleEngine", "SamplingParams", "Completion", "EngineStateError",
    "HFEngine", "VLLMEngine", "SGLangEngine", "iter_weight_buckets", "push_weights",
    "EngineConfig", "engine_config", "build_engine", "sleep_engines", "wake_engines",
]
