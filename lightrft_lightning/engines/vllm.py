"""`VLLMEngine`: a colocated ``vllm.LLM`` with sleep mode, driven through its documented calls."""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightrft_lightning.engines.base import Completion, LifecycleEngine, SamplingParams, _require


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs on each vLLM worker (in process under ``external_launcher``): the model's own loader
    maps Hugging Face names to vLLM's fused layers and shards them for tensor parallelism."""
    worker.model_runner.model.load_weights(weights=weights)


class VLLMEngine(LifecycleEngine):
    """A ``vllm.LLM`` built with ``enable_sleep_mode=True``, one per trainer rank (or per
    tensor-parallel group) under ``distributed_executor_backend="external_launcher"``.

    Weight pushes go in process to each worker's ``model.load_weights``; the prefix cache is reset
    after the last bucket. Level-1 sleep keeps weights in CPU memory; level 2 drops them.

    Args:
        model: a local Hugging Face model directory (ignored when ``llm`` is given).
        llm: an existing ``vllm.LLM`` (built with sleep mode) to wrap instead of building one.
        sleep_level: what ``sleep()`` does by default (1 or 2).
        tensor_parallel_size, gpu_memory_utilization, dtype, seed: passed to ``vllm.LLM``.
        llm_kwargs: any other ``vllm.LLM`` argument.
    """

    def __init__(self, model: Optional[str] = None, *, llm: Any = None, sleep_level: int = 1,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5, dtype: str = "auto",
                 seed: int = 0, **llm_kwargs: Any) -> None:
        super().__init__(sleep_level)
        if llm is None:
            if model is None:
                raise ValueError("VLLMEngine: pass model= (a local Hugging Face directory) or llm= (a vllm.LLM)")
            vllm = _require("vllm", "vllm")
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
            llm = vllm.LLM(model=model, enable_sleep_mode=True, tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed, **llm_kwargs)
        self.llm = llm

    def _sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def _wake(self, tags: list[str]) -> None:
        self.llm.wake_up(tags=tags)

    def _load(self, named_tensors: list[tuple[str, torch.Tensor]], last_bucket: bool) -> None:
        self.llm.collective_rpc(_load_weights_on_worker, args=(named_tensors,))

    def finish_weight_update(self) -> None:
        self.llm.reset_prefix_cache()  # cached prefixes hold activations of the old weights

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        vllm = _require("vllm", "vllm")
        sampling = vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_tokens=params.max_new_tokens, ignore_eos=not params.stop_at_eos, seed=params.seed, logprobs=0,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        completions = []
        for index, request in enumerate(outputs):
            for out in request.outputs:
                ids = list(out.token_ids)
                logprobs = [step[tok].logprob for tok, step in zip(ids, out.logprobs or [])]
                completions.append(Completion(index, ids, logprobs, "eos" if out.finish_reason == "stop" else "length"))
        return completions
