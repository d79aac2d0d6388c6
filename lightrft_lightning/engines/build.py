"""The one engine builder: :func:`engine_config` derives an :class:`EngineConfig` from a
``StrategyConfig`` and the training precision (the one set of defaults, the one dtype rule), and
:func:`build_engine` turns it into a rollout engine. ``RolloutEngineCallback`` and the LightRFT call
``setup_inference_engine`` both build here."""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lightrft_lightning.config import ENGINE_TYPES, StrategyConfig, precision_name
from lightrft_lightning.engines import memory
from lightrft_lightning.engines.base import RolloutEngine, check_sleep_level
from lightrft_lightning.lora import has_lora
from lightrft_lightning.parallel.sharding import is_sharded

# the byte budget of one weight-streaming bucket: the extra memory of a push is about one bucket plus
# the largest parameter; larger buckets mean fewer engine reloads per push
DEFAULT_BUCKET_BYTES = 256 << 20

# training precision -> the dtype the actor computes in (fp32: the actor's stored dtype)
_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_ENGINE_FIELDS = ("engine_type", "engine_tp_size", "engine_mem_util")


@dataclass(frozen=True)
class EngineConfig:
    """What :func:`build_engine` builds; make it with :func:`engine_config`.

    ``dtype``: the generation dtype (``None``: the actor's). ``sleep_level``: what the engine's sleep
    does (1 keeps the weights in CPU memory, 2 drops them; ``None``: the engine never sleeps).
    ``kwargs``: more ``vllm.LLM`` / ``sglang.Engine`` arguments."""

    engine_type: str
    dtype: Optional[torch.dtype]
    tp_size: int
    mem_util: float
    sleep_level: Optional[int]
    seed: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    pad_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engine_type not in ENGINE_TYPES:
            raise ValueError(f"EngineConfig.engine_type={self.engine_type!r} is invalid; accepted: {', '.join(ENGINE_TYPES)}")
        check_bucket_bytes(self.bucket_bytes)
        if self.sleep_level is not None:
            check_sleep_level(self.sleep_level)
        if self.engine_type == "vllm_server" and not self.kwargs.get("urls"):
            raise ValueError("engine_type='vllm_server' needs the servers' URLs: engine_kwargs={'urls': "
                             "['http://127.0.0.1:8000', ...]} (RolloutEngineCallback(engine_kwargs=...)); accepted: "
                             "one or more base URLs of `lightrft-lightning serve` servers")
        if self.kwargs and self.engine_type == "hf":
            raise ValueError(f"engine_kwargs={self.kwargs!r} would be ignored: they are for engine_type 'vllm'/'sglang'; "
                             "accepted: {} with engine_type='hf'")


def check_bucket_bytes(bucket_bytes: int) -> int:
    if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes!r} is invalid; accepted: an integer >= 1")
    return bucket_bytes


def generation_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype an engine generates in under the training ``precision`` (a Lightning flag or "bf16" /
    "fp16" / "fp32"): the one the actor computes in (bf16 under "bf16-mixed"/"bf16-true", fp16 under
    "16-*"), never an fp32 master copy's; ``None`` (the actor's own dtype) for every other flag."""
    return _COMPUTE_DTYPES.get(precision_name(precision))


def engine_config(config: Optional[StrategyConfig], precision: str, *, engine_type: Optional[str] = None,
                  sleep_level: Optional[int] = None, fallback_sleep_level: Optional[int] = None,
                  bucket_bytes: Optional[int] = None, pad_token_id: Optional[int] = None,
                  eos_token_id: Optional[int | list[int]] = None,
                  engine_kwargs: Optional[dict[str, Any]] = None) -> EngineConfig:
    """The engine ``config`` (``None``: the defaults) asks for, trained under ``precision``.

    The keywords override the config's values (``None``: keep them); the sleep level is ``sleep_level``,
    else ``engine_sleep_level``, else ``fallback_sleep_level`` (a given engine's own), else
    :func:`default_sleep_level`. A ``sleep_level`` given here that disagrees with the config's
    ``engine_sleep_level``, or that ``enable_engine_sleep=False`` would ignore, is refused."""
    config = config if config is not None else StrategyConfig()
    engine_type = engine_type or config.engine_type
    if engine_type == "vllm_server" and (sleep_level or config.engine_sleep_level) is not None:
        raise ValueError(f"sleep_level={sleep_level or config.engine_sleep_level!r} would be ignored: "
                         "engine_type='vllm_server' runs on the servers' own devices, the trainer's memory holds "
                         "nothing to free; accepted: sleep_level=None and StrategyConfig.engine_sleep_level=None")
    level = sleep_level or config.engine_sleep_level or fallback_sleep_level or default_sleep_level(engine_type)
    if sleep_level is not None:
        check_sleep_level(sleep_level)
        if not config.enable_engine_sleep:
            raise ValueError(f"sleep_level={sleep_level!r} would be ignored: StrategyConfig.enable_engine_sleep=False "
                             "keeps the engine awake; accepted: sleep_level=None, or enable_engine_sleep=True")
        if config.engine_sleep_level not in (None, sleep_level):
            raise ValueError(f"sleep_level={sleep_level!r} disagrees with StrategyConfig.engine_sleep_level="
                             f"{config.engine_sleep_level!r}; accepted: one of them, or both the same")
    return EngineConfig(engine_type=engine_type, dtype=generation_dtype(precision), tp_size=config.engine_tp_size,
                        mem_util=config.engine_mem_util, sleep_level=level if config.enable_engine_sleep else None,
                        seed=config.seed, bucket_bytes=DEFAULT_BUCKET_BYTES if bucket_bytes is None else bucket_bytes,
                        pad_token_id=pad_token_id, eos_token_id=eos_token_id, kwargs=dict(engine_kwargs or {}))


def default_sleep_level(engine_type: str) -> int:
    """The sleep level when ``StrategyConfig.engine_sleep_level`` is None: 2 (weights dropped) for vLLM and
    SGLang, whose weights are pushed before every rollout that follows an optimizer step (level 1 would
    copy them to host memory at each sleep and back at each wake, only for the push to overwrite them;
    vLLM's docs name level 2 for RLHF weight updates); 1 for the built-in HF engine, which in one process
    generates from the actor's own tensors (level 2 would make it hold a copy)."""
    return 1 if engine_type in ("hf", "vllm_server") else 2  # a server's sleep is a no-op: nothing to drop


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(StrategyConfig) if f.name == name)


def refuse_ignored_fields(config: Any, reason: str, fields: Sequence[str] = _ENGINE_FIELDS) -> None:
    """Refuse ``StrategyConfig`` engine fields that would be ignored (set away from their defaults)."""
    if not isinstance(config, StrategyConfig):
        return
    for name in fields:
        if getattr(config, name) != _default(name):
            raise ValueError(f"StrategyConfig.{name}={getattr(config, name)!r} would be ignored: {reason}; "
                             f"accepted: {_default(name)!r} here, or engine_type 'vllm'/'sglang' without engine=")


def build_engine(config: EngineConfig, actor: Optional[nn.Module], *, model_path: Optional[str] = None,
                 device: Any = None, share_weights: bool = False, pending_bytes: int = 0) -> RolloutEngine:
    """The engine ``config`` describes, for ``actor`` (a Hugging Face model, possibly sharded).

    "hf": an ``HFEngine`` from the actor's config on ``device``, filled by the first push; with
    ``share_weights`` and an actor this process holds whole, in the generation dtype, on ``device``
    and without LoRA, one that generates from the actor's own tensors instead (no second copy).
    "vllm" / "sglang": the engine of ``model_path`` (default: the actor's ``config.name_or_path``), a
    local Hugging Face directory. Sleep is the caller's: the engine comes back awake. On CUDA a "vllm" /
    "sglang" engine is built only when ``engine_mem_util`` x device memory is free now and stays free once
    the trainer allocates ``pending_bytes`` more (its optimizer state; :mod:`~lightrft_lightning.engines.memory`),
    else a ``ValueError`` names the setting and the value that fits."""
    if config.engine_type == "hf":
        return _hf_engine(config, actor, device, share_weights)
    if config.engine_type == "vllm_server":
        return _server_engine(config)
    try:
        importlib.import_module(config.engine_type)
    except ImportError as err:
        raise ImportError(
            f"StrategyConfig.engine_type={config.engine_type!r} needs the {config.engine_type} package, which does not "
            f"import ({err}); install it with `pip install 'lightrft-lightning[{config.engine_type}]'`, or use "
            f"engine_type='hf' (built in); accepted: {', '.join(map(repr, ENGINE_TYPES))}") from err
    path = model_path or (actor.config.name_or_path if actor is not None else None)
    if not path or not os.path.isdir(str(path)):
        raise ValueError(
            f"StrategyConfig.engine_type={config.engine_type!r} loads the actor's Hugging Face directory, but the actor's "
            f"config.name_or_path is {path!r}, not a local directory; accepted: an actor loaded from a local directory "
            "(model=<path>, or args.pretrain for setup_inference_engine), engine_type='hf', or "
            "RolloutEngineCallback(engine=...)")
    available = memory.device_memory(device)
    if available is not None:
        memory.check_engine_fits(config.mem_util, available, pending_bytes)
    level = config.sleep_level or 1  # an engine that never sleeps: its sleep level is never used
    # explicit: the engines' "auto" takes the checkpoint's dtype, not the one the actor trains in
    dtype = _DTYPE_NAMES.get(config.dtype or (next(actor.parameters()).dtype if actor is not None else None), "auto")
    if config.engine_type == "vllm":
        from lightrft_lightning.engines.vllm import VLLMEngine

        kwargs = {"dtype": dtype, "eos_token_id": config.eos_token_id, **config.kwargs}
        return VLLMEngine(str(path), sleep_level=level, tensor_parallel_size=config.tp_size,
                          gpu_memory_utilization=config.mem_util, seed=config.seed, **kwargs)
    from lightrft_lightning.engines.sglang import SGLangEngine

    return SGLangEngine(str(path), sleep_level=level, tp_size=config.tp_size, mem_fraction_static=config.mem_util,
                        random_seed=config.seed, **{"dtype": dtype, **config.kwargs})


def _hf_engine(config: EngineConfig, actor: Optional[nn.Module], device: Any, share_weights: bool) -> RolloutEngine:
    from lightrft_lightning.engines.hf import HFEngine

    if actor is None:
        raise ValueError("engine_type='hf' builds the engine from the actor's config; pass the actor "
                         "(setup_inference_engine(..., actor=...))")
    hf_config = actor.config
    eos = config.eos_token_id if config.eos_token_id is not None else hf_config.eos_token_id
    pad = config.pad_token_id
    if pad is None:
        pad = hf_config.pad_token_id if hf_config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    dtype = config.dtype or next(actor.parameters()).dtype
    device = torch.device(device) if device is not None else next(actor.parameters()).device
    kwargs = dict(pad_token_id=pad or 0, eos_token_id=eos, sleep_level=config.sleep_level or 1, device=device)
    if share_weights and not has_lora(actor) and all(not is_sharded(p) and p.dtype == dtype and p.device == device
                                                     for p in actor.parameters()):
        # a LoRA actor's engine holds the merged weights instead
        return HFEngine(actor, share_weights=True, **kwargs)
    return HFEngine.from_config(hf_config, dtype=dtype, **kwargs)


def _server_engine(config: EngineConfig) -> RolloutEngine:
    from lightrft_lightning.engines.server import VLLMServerEngine

    if (config.tp_size, config.mem_util) != (_default("engine_tp_size"), _default("engine_mem_util")):
        raise ValueError(f"StrategyConfig.engine_tp_size={config.tp_size!r} / engine_mem_util={config.mem_util!r} would "
                         "be ignored: a vLLM server's parallelism and memory are set where it starts "
                         "(lightrft-lightning serve); accepted: their defaults with engine_type='vllm_server'")
    kwargs = {"eos_token_id": config.eos_token_id, **config.kwargs}
    kwargs.setdefault("dtype", config.dtype)
    return VLLMServerEngine(**kwargs)
