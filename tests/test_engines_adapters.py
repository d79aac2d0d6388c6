"""VLLMEngine and SGLangEngine against recording fakes whose signatures mirror the documented
``vllm.LLM`` / ``sglang.Engine`` calls (engine-apis.md), plus contract tests that compare those
signatures with the real packages where they import."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import types
from typing import Any, Callable, Optional, Union

import pytest
import torch

from lightrft_lightning.engines import (
    EngineStateError,
    SamplingParams,
    SGLangEngine,
    VLLMEngine,
    iter_weight_buckets,
    push_weights,
)
from lightrft_lightning.tiny_models import tiny_causal_lm


# ---------------------------------------------------------------------------- vLLM fakes
class FakeVLLMSamplingParams:
    def __init__(self, n: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: Optional[int] = None, stop_token_ids: Optional[list[int]] = None, max_tokens: Optional[int] = 16,
                 logprobs: Optional[int] = None, ignore_eos: bool = False, detokenize: bool = True,
                 **kwargs: Any) -> None:
        if n > 1 and temperature == 0:  # what real vLLM says
            raise ValueError("n must be 1 when using greedy sampling, got 2.")
        self.__dict__.update(n=n, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             stop_token_ids=stop_token_ids, max_tokens=max_tokens, logprobs=logprobs,
                             ignore_eos=ignore_eos, detokenize=detokenize)


class FakePlatform:
    """``vllm.platforms.current_platform``: CUDA-like (sleep mode) or CPU-like (none)."""

    def __init__(self, cpu: bool) -> None:
        self.cpu = cpu

    def is_sleep_mode_available(self) -> bool:
        return not self.cpu

    def is_cpu(self) -> bool:
        return self.cpu


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
        self.other_kwargs = kwargs
        self.launcher_env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        self.calls: list[tuple] = []
        self.loaded: dict[str, torch.Tensor] = {}

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True

    def collective_rpc(self, method: Union[str, Callable], timeout: Optional[float] = None, args: tuple = (),
                       kwargs: Optional[dict] = None) -> list:
        # a method name: a Python function needs insecure serialization when the engine core is its own process
        assert method == "reload_weights" and not args and kwargs["is_checkpoint_format"] is True
        weights = list(kwargs["weights_iterator"])
        self.calls.append(("load_weights", [n for n, _ in weights]))
        self.loaded.update((n, t.clone()) for n, t in weights)
        return [None]

    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = True, lora_request: Any = None,
                 **kwargs: Any) -> list:
        self.calls.append(("generate", len(prompts)))
        self.last_sampling = sampling_params
        outs = []
        per_prompt = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(per_prompt) == len(prompts)
        for i, (prompt, sp) in enumerate(zip(prompts, per_prompt)):
            assert list(prompt) == ["prompt_token_ids"]
            completions = [types.SimpleNamespace(token_ids=[i + 1, 2], logprobs=[{i + 1: _Logprob(-0.5)}, {2: _Logprob(-0.25)}],
                                                 finish_reason="stop" if j == 0 else "length")
                           for j in range(sp.n)]
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


_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def fake_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeVLLMSamplingParams))
    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=FakeSGLangEngine))
    for key in _LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)


def _set_platform(monkeypatch, name: str) -> str:
    monkeypatch.setitem(sys.modules, "vllm.platforms", types.SimpleNamespace(current_platform=FakePlatform(name == "cpu")))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    return name


@pytest.fixture(params=["cuda", "cpu"])
def platform(request, fake_packages, monkeypatch):
    """vLLM's platform layer, CUDA-like or CPU-like."""
    return _set_platform(monkeypatch, request.param)


@pytest.fixture
def cpu_platform(fake_packages, monkeypatch):
    return _set_platform(monkeypatch, "cpu")


# ---------------------------------------------------------------------------- tests
def test_vllm_is_built_in_process_with_sleep_mode_only_where_the_platform_has_it(platform):
    engine = VLLMEngine("/models/x", sleep_level=2, tensor_parallel_size=1)
    cpu = platform == "cpu"
    assert engine.llm.init_kwargs == {"model": "/models/x", "enable_sleep_mode": not cpu,
                                      "distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1}
    # CPU: a KV cache of 1 GiB (not a fraction of the host's memory); one process: no data parallelism
    # log-probs of the distribution sampled from (temperature, top-k, top-p), as the learner's weights take them
    assert engine.llm.other_kwargs == ({"kv_cache_memory_bytes": 1 << 30} if cpu else {}) | {
        "logprobs_mode": "processed_logprobs"}
    assert engine.sleep_mode is not cpu
    assert engine.weights_survive_sleep is cpu  # level 2 drops the weights only with sleep mode
    assert VLLMEngine("/m").weights_survive_sleep
    # one process: the launcher's variables during start-up, and none left behind afterwards
    env = engine.llm.launcher_env
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "0", "1", "127.0.0.1")
    assert int(env["MASTER_PORT"]) > 0 and not any(k in os.environ for k in _LAUNCHER_ENV)
    if cpu:
        with pytest.raises(ValueError, match=r"enable_sleep_mode=True is not supported by vLLM on this platform"):
            VLLMEngine("/m", enable_sleep_mode=True)


def test_vllm_without_sleep_mode_keeps_the_bookkeeping(cpu_platform):
    engine = VLLMEngine("/m", sleep_level=2)
    engine.sleep()
    assert engine.is_sleeping and engine.weights_valid  # nothing was dropped
    with pytest.raises(EngineStateError, match="asleep"):
        engine.generate([[1]], SamplingParams())
    with pytest.raises(EngineStateError, match="weights are asleep"):
        engine.update_weights([("x", torch.zeros(1))])
    engine.wake_up(["weights"])
    assert engine.is_sleeping
    engine.wake_up(["kv_cache"])
    assert not engine.is_sleeping
    engine.generate([[1]], SamplingParams())
    assert [c[0] for c in engine.llm.calls] == ["generate"]  # no sleep/wake_up reached vLLM


def test_vllm_data_parallel_size_from_the_trainer_world(fake_packages, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert VLLMEngine("/m").llm.other_kwargs["data_parallel_size"] == 4
    assert VLLMEngine("/m", tensor_parallel_size=2).llm.other_kwargs["data_parallel_size"] == 2
    with pytest.raises(ValueError, match=r"4 ranks do not split into engines of tensor_parallel_size x "
                                         r"pipeline_parallel_size = 3"):
        VLLMEngine("/m", tensor_parallel_size=3)
    assert os.environ["RANK"] == "3" and "LOCAL_RANK" not in os.environ


def test_vllm_greedy_n_and_seeds_and_stop_tokens(fake_packages, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    engine = VLLMEngine(str(tmp_path))
    assert engine.eos_token_ids == [7, 9]
    assert engine.llm.other_kwargs["skip_tokenizer_init"] is True  # a directory without a tokenizer
    out = engine.generate([[1, 2], [3]], SamplingParams(n=3, temperature=0, max_new_tokens=4))
    sampling = engine.llm.last_sampling
    assert [(sp.n, sp.temperature, sp.stop_token_ids, sp.seed) for sp in sampling] == [(1, 0, [7, 9], None)] * 2
    assert [(c.prompt_index, c.token_ids) for c in out] == [(0, [1, 2])] * 3 + [(1, [2, 2])] * 3
    out[0].token_ids.append(5)
    assert out[1].token_ids == [1, 2]  # repeated, not aliased
    engine.generate([[1], [2], [3]], SamplingParams(n=2, seed=10, stop_at_eos=False))
    sampling = engine.llm.last_sampling
    assert [sp.seed for sp in sampling] == [10, 12, 14]  # vLLM seeds a request's n samples seed, seed + 1, ...
    assert all(sp.n == 2 and sp.ignore_eos and sp.stop_token_ids == [] and sp.logprobs == 0 for sp in sampling)


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
    assert calls[2:2 + len(loads)] == loads and len(loads) == 1  # one reload per push, whatever the buckets
    assert calls[2 + len(loads):] == [("reset_prefix_cache",), ("wake_up", ["kv_cache"]), ("generate", 2)]
    assert [n for c in loads for n in c[1]] == [n for n, _ in actor.named_parameters()]  # each tensor once, in order
    assert all(torch.equal(engine.llm.loaded[n], p) for n, p in actor.named_parameters())
    assert nbytes == sum(p.numel() * 4 for p in actor.parameters())
    sp = engine.llm.last_sampling[0]
    assert (sp.n, sp.max_tokens, sp.seed, sp.ignore_eos, sp.logprobs, sp.detokenize) == (2, 5, 4, True, 0, False)
    assert [(c.prompt_index, c.token_ids, c.logprobs, c.finish_reason) for c in out] == [
        (0, [1, 2], [-0.5, -0.25], "eos"), (0, [1, 2], [-0.5, -0.25], "length"),
        (1, [2, 2], [-0.5, -0.25], "eos"), (1, [2, 2], [-0.5, -0.25], "length")]


def test_vllm_refuses_an_engine_whose_log_probs_are_not_of_the_sampled_distribution(fake_packages):
    llm = FakeLLM("/m")
    llm.llm_engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(
        model_config=types.SimpleNamespace(logprobs_mode="raw_logprobs", model="/m")))
    with pytest.raises(ValueError, match="logprobs_mode is 'raw_logprobs'.*accepted: logprobs_mode='processed_logprobs'"):
        VLLMEngine(llm=llm)
    with pytest.raises(ValueError, match="logprobs_mode is 'raw_logits'"):
        VLLMEngine("/m", logprobs_mode="raw_logits")  # refused before vLLM is built


@pytest.mark.parametrize("bucket_bytes", [1, 3000, 8192, 1 << 30])
def test_vllm_reloads_never_split_a_decoder_layer(fake_packages, bucket_bytes):
    """vLLM's in-place reload builds a fused layer (qkv, gate_up) from the tensors of one call: a layer
    split over two reloads gets garbage (checked on real vLLM). ``push_weights`` sends the whole update
    in one reload (issue 29 risk 6: each reload walks every module); buckets sent one by one with
    ``update_weights`` are reloaded one by one, the tensors of the layer a bucket ends in waiting for the next."""
    from lightrft_lightning.engines.vllm import reload_group

    actor = tiny_causal_lm()
    engine = VLLMEngine("/m")
    push_weights(actor, engine, bucket_bytes=bucket_bytes)
    assert [c[1] for c in engine.llm.calls if c[0] == "load_weights"] == [[n for n, _ in actor.named_parameters()]]
    assert engine.reloads == 1 and all(torch.equal(engine.llm.loaded[n], p) for n, p in actor.named_parameters())

    engine = VLLMEngine("/m")
    buckets = list(iter_weight_buckets(actor, bucket_bytes))
    for index, bucket in enumerate(buckets):
        engine.update_weights(bucket, last_bucket=index == len(buckets) - 1)
    engine.finish_weight_update()
    loads = [c[1] for c in engine.llm.calls if c[0] == "load_weights"]
    groups = [{reload_group(n) for n in names} for names in loads]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1:])
    assert [n for names in loads for n in names] == [n for n, _ in actor.named_parameters()]
    assert all(torch.equal(engine.llm.loaded[n], p) for n, p in actor.named_parameters())
    assert len(loads) == engine.reloads and (len(loads) == 1) == (bucket_bytes == 1 << 30)
    assert reload_group("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert reload_group("model.embed_tokens.weight") == "model.embed_tokens"


def test_vllm_one_reload_copies_the_layer_a_bucket_ends_in(fake_packages):
    """In the one-reload stream, a bucket's tensors may be gathered buffers the next bucket reuses, and
    vLLM keeps a layer's tensors until the layer is complete: the split layer's tensors are copies."""
    engine = VLLMEngine("/m")
    buffer = torch.ones(2)

    def buckets():
        yield [("model.embed_tokens.weight", torch.ones(3)), ("model.layers.0.a.weight", buffer)], False
        buffer.zero_()  # the next gather reuses the buffer
        yield [("model.layers.0.b.weight", buffer)], True

    engine.load_weight_buckets(buckets())
    assert torch.equal(engine.llm.loaded["model.layers.0.a.weight"], torch.ones(2)) and engine.reloads == 1
    assert [c[1] for c in engine.llm.calls if c[0] == "load_weights"] == [
        ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.0.b.weight"]]
    engine.sleep(2)
    with pytest.raises(EngineStateError, match=r"load_weight_buckets: the weights are asleep"):
        engine.load_weight_buckets(iter([]))


def test_vllm_held_tensors_are_copies(fake_packages):
    """A bucket's tensors may be gathered buffers reused by the next bucket: the ones held back are copied."""
    engine = VLLMEngine("/m")
    buffer = torch.ones(2)
    engine.update_weights([("model.layers.0.a.weight", buffer)], last_bucket=False)
    buffer.zero_()
    engine.update_weights([("model.layers.0.b.weight", buffer)], last_bucket=True)
    engine.finish_weight_update()
    assert torch.equal(engine.llm.loaded["model.layers.0.a.weight"], torch.ones(2))
    assert [c[1] for c in engine.llm.calls if c[0] == "load_weights"] == [["model.layers.0.a.weight", "model.layers.0.b.weight"]]


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


def test_sglang_greedy_n_generates_once_per_prompt(fake_packages):
    engine = SGLangEngine("/m")
    out = engine.generate([[1, 2], [3]], SamplingParams(n=3, temperature=0, seed=5))
    assert engine.engine.calls[-1] == ("generate", 2)
    assert isinstance(engine.engine.last_sampling, dict)  # no per-row seeds for greedy rows
    assert [(c.prompt_index, c.token_ids) for c in out] == [(0, [0, 2])] * 3 + [(1, [1, 2])] * 3


def test_sglang_without_memory_saver_keeps_the_bookkeeping(fake_packages):
    engine = SGLangEngine("/m", sleep_level=2, device="cpu")
    assert engine.engine.init_kwargs == {"model_path": "/m", "enable_memory_saver": False, "enable_weights_cpu_backup": False}
    assert engine.weights_survive_sleep and not engine.memory_saver
    engine.sleep()
    with pytest.raises(EngineStateError, match="asleep"):
        engine.generate([[1]], SamplingParams())
    engine.wake_up()
    engine.update_weights([("w", torch.zeros(1))])
    engine.generate([[1]], SamplingParams())
    assert [c[0] for c in engine.engine.calls] == ["update_weights_from_tensor", "generate"]


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
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or name == "self":
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
