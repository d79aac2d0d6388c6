"""VLLMEngine and SGLangEngine against recording fakes whose signatures mirror the documented
``vllm.LLM`` / ``sglang.Engine`` calls (engine-apis.md), plus contract tests that compare those
signatures with the real packages where they import."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
from typing import Any, Callable, Optional, Union

import pytest
import torch

from lightrft_lightning.engines import EngineStateError, SamplingParams, SGLangEngine, VLLMEngine, push_weights
from lightrft_lightning.tiny_models import tiny_causal_lm


# ---------------------------------------------------------------------------- vLLM fakes
class FakeVLLMSamplingParams:
    def __init__(self, n: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: Optional[int] = None, max_tokens: Optional[int] = 16, logprobs: Optional[int] = None,
                 ignore_eos: bool = False, **kwargs: Any) -> None:
        self.__dict__.update(n=n, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             max_tokens=max_tokens, logprobs=logprobs, ignore_eos=ignore_eos)


class _Logprob:
    def __init__(self, logprob: float) -> None:
        self.logprob = logprob


class FakeLLM:
    """Records every call; ``generate`` answers token i+1 for prompt i with log-prob -0.5."""

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.9, enable_sleep_mode: bool = False,
                 distributed_executor_backend: Optional[str] = None, **kwargs: Any) -> None:
        self.init_kwargs = dict(model=model, enable_sleep_mode=enable_sleep_mode,
                                distributed_executor_backend=distributed_executor_backend,
                                tensor_parallel_size=tensor_parallel_size)
        self.calls: list[tuple] = []
        self.loaded: dict[str, torch.Tensor] = {}
        llm = self

        class _Model:
            def load_weights(self, weights):
                llm.calls.append(("load_weights", [n for n, _ in weights]))
                llm.loaded.update((n, t.clone()) for n, t in weights)

        self._worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=_Model()))

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self, device: Any = None) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True

    def collective_rpc(self, method: Union[str, Callable], timeout: Optional[float] = None, args: tuple = (),
                       kwargs: Optional[dict] = None) -> list:
        assert callable(method)
        return [method(self._worker, *args, **(kwargs or {}))]

    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = True, lora_request: Any = None,
                 **kwargs: Any) -> list:
        self.calls.append(("generate", len(prompts)))
        self.last_sampling = sampling_params
        outs = []
        for i, prompt in enumerate(prompts):
            assert list(prompt) == ["prompt_token_ids"]
            completions = [types.SimpleNamespace(token_ids=[i + 1, 2], logprobs=[{i + 1: _Logprob(-0.5)}, {2: _Logprob(-0.25)}],
                                                 finish_reason="stop" if j == 0 else "length")
                           for j in range(sampling_params.n)]
            outs.append(types.SimpleNamespace(outputs=completions))
        return outs


# ---------------------------------------------------------------------------- SGLang fake
class FakeSGLangEngine:
    def __init__(self, model_path: str = "", *, enable_memory_saver: bool = False, enable_weights_cpu_backup: bool = False,
                 **kwargs: Any) -> None:
        self.init_kwargs = dict(model_path=model_path, enable_memory_saver=enable_memory_saver,
                                enable_weights_cpu_backup=enable_weights_cpu_backup)
        self.calls: list[tuple] = []
        self.loaded: dict[str, torch.Tensor] = {}

    def release_memory_occupation(self, tags: Optional[list[str]] = None) -> None:
        self.calls.append(("release_memory_occupation", tags))

    def resume_memory_occupation(self, tags: Optional[list[str]] = None) -> None:
        self.calls.append(("resume_memory_occupation", tags))

    def update_weights_from_tensor(self, named_tensors: list[tuple[str, torch.Tensor]], load_format: Optional[str] = None,
                                   flush_cache: bool = True) -> None:
        self.calls.append(("update_weights_from_tensor", len(named_tensors), flush_cache))
        self.loaded.update((n, t.clone()) for n, t in named_tensors)

    def generate(self, prompt: Any = None, sampling_params: Any = None, input_ids: Any = None,
                 return_logprob: Any = False, **kwargs: Any) -> list[dict]:
        self.calls.append(("generate", len(input_ids)))
        self.last_sampling = sampling_params
        return [{"output_ids": [i, 2], "meta_info": {"finish_reason": {"type": "stop" if i % 2 else "length"},
                                                     "output_token_logprobs": [(-0.5, i, None), (-0.25, 2, None)]}}
                for i in range(len(input_ids))]


@pytest.fixture
def fake_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeVLLMSamplingParams))
    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=FakeSGLangEngine))


# ---------------------------------------------------------------------------- tests
def test_vllm_is_built_with_sleep_mode_in_process(fake_packages):
    engine = VLLMEngine("/models/x", sleep_level=2, tensor_parallel_size=2)
    assert engine.llm.init_kwargs == {"model": "/models/x", "enable_sleep_mode": True,
                                      "distributed_executor_backend": "external_launcher", "tensor_parallel_size": 2}
    assert not engine.weights_survive_sleep and VLLMEngine("/m").weights_survive_sleep


def test_vllm_push_order_and_prefix_cache_reset(fake_packages):
    actor = tiny_causal_lm()
    engine = VLLMEngine("/m", sleep_level=2)
    engine.sleep()
    engine.wake_up(["weights"])
    nbytes = push_weights(actor, engine, bucket_bytes=8192)
    engine.wake_up(["kv_cache"])
    out = engine.generate([[1, 2], [3]], SamplingParams(n=2, max_new_tokens=5, seed=4, stop_at_eos=False))
    calls = engine.llm.calls
    loads = [c for c in calls if c[0] == "load_weights"]
    assert calls[:2] == [("sleep", 2), ("wake_up", ["weights"])]
    assert calls[2:2 + len(loads)] == loads and len(loads) > 1
    assert calls[2 + len(loads):] == [("reset_prefix_cache",), ("wake_up", ["kv_cache"]), ("generate", 2)]
    assert {n for c in loads for n in c[1]} == {n for n, _ in actor.named_parameters()}
    assert all(torch.equal(engine.llm.loaded[n], p) for n, p in actor.named_parameters())
    assert nbytes == sum(p.numel() * 4 for p in actor.parameters())
    sp = engine.llm.last_sampling
    assert (sp.n, sp.max_tokens, sp.seed, sp.ignore_eos, sp.logprobs) == (2, 5, 4, True, 0)
    assert [(c.prompt_index, c.token_ids, c.logprobs, c.finish_reason) for c in out] == [
        (0, [1, 2], [-0.5, -0.25], "eos"), (0, [1, 2], [-0.5, -0.25], "length"),
        (1, [2, 2], [-0.5, -0.25], "eos"), (1, [2, 2], [-0.5, -0.25], "length")]


def test_vllm_level2_without_push_refuses_to_generate(fake_packages):
    engine = VLLMEngine("/m", sleep_level=2)
    engine.sleep()
    engine.wake_up()
    with pytest.raises(EngineStateError, match="no valid weights"):
        engine.generate([[1]], SamplingParams())
    assert ("generate", 1) not in engine.llm.calls


def test_sglang_memory_saver_tags_and_flush_only_on_last_bucket(fake_packages):
    actor = tiny_causal_lm()
    engine = SGLangEngine("/m", sleep_level=1)
    assert engine.engine.init_kwargs == {"model_path": "/m", "enable_memory_saver": True, "enable_weights_cpu_backup": True}
    assert engine.weights_survive_sleep and not SGLangEngine("/m", sleep_level=2).weights_survive_sleep
    engine.sleep()
    engine.wake_up(["weights"])
    push_weights(actor, engine, bucket_bytes=8192)
    engine.wake_up(["kv_cache"])
    out = engine.generate([[1, 2], [3]], SamplingParams(n=2, seed=10))
    calls = engine.engine.calls
    updates = [c for c in calls if c[0] == "update_weights_from_tensor"]
    assert calls[:2] == [("release_memory_occupation", None), ("resume_memory_occupation", ["weights"])]
    assert [c[2] for c in updates] == [False] * (len(updates) - 1) + [True] and len(updates) > 1
    assert calls[2 + len(updates):] == [("resume_memory_occupation", ["kv_cache", "cuda_graph"]), ("generate", 4)]
    assert all(torch.equal(engine.engine.loaded[n], p) for n, p in actor.named_parameters())
    assert [s["sampling_seed"] for s in engine.engine.last_sampling] == [10, 11, 12, 13]
    assert [(c.prompt_index, c.finish_reason) for c in out] == [(0, "length"), (0, "eos"), (1, "length"), (1, "eos")]


def test_sglang_without_cpu_backup_needs_a_push(fake_packages):
    engine = SGLangEngine("/m", sleep_level=1, weights_cpu_backup=False)
    engine.sleep()
    engine.wake_up()
    with pytest.raises(EngineStateError, match="no valid weights"):
        engine.generate([[1]], SamplingParams())


@pytest.mark.parametrize("cls,package", [(VLLMEngine, "vllm"), (SGLangEngine, "sglang")])
def test_missing_package_names_the_extra(cls, package, monkeypatch):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    monkeypatch.delitem(sys.modules, package, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'lightrft-lightning\[{package}\]'"):
        cls("/m")


def _assert_mirrors(real: Callable, fake: Callable) -> None:
    """Every parameter the fake declares (and so the adapter may pass) exists on the real callable."""
    real_params = inspect.signature(real).parameters
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in real_params.values())
    for name, param in inspect.signature(fake).parameters.items():
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        assert name in real_params or has_var_kw, f"{real.__qualname__} has no parameter {name!r}"


def test_contract_vllm_signatures():
    vllm = pytest.importorskip("vllm")
    for method in ("sleep", "wake_up", "reset_prefix_cache", "collective_rpc", "generate"):
        _assert_mirrors(getattr(vllm.LLM, method), getattr(FakeLLM, method))
    _assert_mirrors(vllm.LLM.__init__, FakeLLM.__init__)
    _assert_mirrors(vllm.SamplingParams, FakeVLLMSamplingParams.__init__)


def test_contract_sglang_signatures():
    sglang = pytest.importorskip("sglang")
    for method in ("release_memory_occupation", "resume_memory_occupation", "update_weights_from_tensor", "generate"):
        _assert_mirrors(getattr(sglang.Engine, method), getattr(FakeSGLangEngine, method))
