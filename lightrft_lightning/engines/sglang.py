"""`SGLangEngine`: an in-process ``sglang.Engine`` with the memory saver, driven through its documented calls."""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightrft_lightning.engines.base import Completion, LifecycleEngine, SamplingParams, require_package

# our pools -> SGLang's memory tags (the CUDA graphs are released with the KV cache and come back with it)
_TAGS = {"weights": ["weights"], "kv_cache": ["kv_cache", "cuda_graph"]}


class SGLangEngine(LifecycleEngine):
    """A ``sglang.Engine`` built with ``enable_memory_saver=True`` where it has one (a CUDA engine).

    ``sleep`` releases all its GPU memory; the weights survive it only with
    ``enable_weights_cpu_backup`` (default: on for ``sleep_level=1``, off for 2). Without the memory
    saver (``device="cpu"`` or ``enable_memory_saver=False``) ``sleep``/``wake_up`` keep their
    bookkeeping but leave the engine as it is, and the weights survive every level. Weight pushes use
    ``update_weights_from_tensor``, flushing the cache only with the last bucket. Greedy sampling with
    ``n > 1`` generates each prompt once and repeats it ``n`` times (greedy samples are equal).

    Args:
        model_path: a local Hugging Face model directory (ignored when ``engine`` is given).
        engine: an existing ``sglang.Engine`` to wrap.
        sleep_level: 1 (weights backed up in CPU memory) or 2 (weights dropped).
        weights_cpu_backup: override what ``sleep_level`` implies for an ``engine`` built elsewhere.
        enable_memory_saver: ``None``: on unless ``device`` is not CUDA (SGLang's memory saver is CUDA's).
        engine_kwargs: any other ``sglang.Engine`` argument (``tp_size``, ``mem_fraction_static``, ``device``...).
    """

    def __init__(self, model_path: Optional[str] = None, *, engine: Any = None, sleep_level: int = 1,
                 weights_cpu_backup: Optional[bool] = None, enable_memory_saver: Optional[bool] = None,
                 **engine_kwargs: Any) -> None:
        super().__init__(sleep_level)
        if enable_memory_saver is None:
            enable_memory_saver = str(engine_kwargs.get("device") or "cuda").startswith("cuda")
        self.memory_saver = bool(enable_memory_saver)
        self.weights_cpu_backup = sleep_level == 1 if weights_cpu_backup is None else weights_cpu_backup
        if engine is None:
            if model_path is None:
                raise ValueError("SGLangEngine: pass model_path= (a local Hugging Face directory) or engine= (a sglang.Engine)")
            sglang = require_package("sglang", "sglang")
            backup = {"enable_weights_cpu_backup": self.weights_cpu_backup} if self.memory_saver else {}
            engine = sglang.Engine(model_path=model_path, enable_memory_saver=self.memory_saver, **backup, **engine_kwargs)
        self.engine = engine

    def _survives(self, level: int) -> bool:
        # SGLang has no levels: the CPU backup decides; without the memory saver nothing is released
        return self.weights_cpu_backup or not self.memory_saver

    def _sleep(self, level: int) -> None:
        if self.memory_saver:
            self.engine.release_memory_occupation(tags=None)

    def _wake(self, tags: list[str]) -> None:
        if self.memory_saver:
            self.engine.resume_memory_occupation(tags=[t for tag in tags for t in _TAGS[tag]])

    def _load(self, named_tensors: list[tuple[str, torch.Tensor]], last_bucket: bool) -> None:
        self.engine.update_weights_from_tensor(named_tensors=named_tensors, load_format=None, flush_cache=last_bucket)

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        sampling: Any = {
            "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "max_new_tokens": params.max_new_tokens, "ignore_eos": not params.stop_at_eos,
        }
        greedy = params.temperature == 0
        per_prompt = 1 if greedy else params.n  # greedy: the n samples are equal, generate one and repeat it
        rows = [p for p in prompts for _ in range(per_prompt)]  # n samples per prompt, grouped by prompt
        if params.seed is not None and not greedy:  # one seed per row, or the n samples of a prompt would be equal
            sampling = [{**sampling, "sampling_seed": params.seed + i} for i in range(len(rows))]
        outputs = self.engine.generate(input_ids=rows, sampling_params=sampling, return_logprob=True)
        completions = []
        for row, out in enumerate(outputs):
            meta = out["meta_info"]
            logprobs = [float(step[0]) for step in meta.get("output_token_logprobs", [])]
            reason = meta.get("finish_reason") or {}
            completion = Completion(row // per_prompt, [int(t) for t in out["output_ids"]], logprobs,
                                    "eos" if reason.get("type") == "stop" else "length")
            completions.extend(Completion(completion.prompt_index, list(completion.token_ids), list(completion.logprobs),
                                          completion.finish_reason) for _ in range(params.n if greedy else 1))
        return completions
