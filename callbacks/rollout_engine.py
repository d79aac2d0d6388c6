"""`RolloutEngineCallback`: owns a rollout engine during ``Trainer.fit`` and runs each rollout's
wake -> push -> generate -> sleep cycle."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightrft_lightning import lightning_api
from lightrft_lightning.config import ENGINE_TYPES, StrategyConfig
from lightrft_lightning.engines.base import Completion, RolloutEngine, SamplingParams, _check_level
from lightrft_lightning.engines.hf import HFEngine
from lightrft_lightning.engines.sglang import SGLangEngine
from lightrft_lightning.engines.vllm import VLLMEngine
from lightrft_lightning.engines.weight_sync import push_weights
from lightrft_lightning.lora import has_lora

log = logging.getLogger(__name__)
_ENGINE_FIELDS = ("engine_type", "engine_tp_size", "engine_mem_util")
_VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class RolloutEngineCallback(Callback):
    """Keeps a rollout engine asleep while the actor trains and awake only for rollouts.

    ``generate`` wakes the weights, pushes the actor's weights when an optimizer stepped since the
    last push (or the engine lost them), wakes the KV cache, generates and puts the engine back to
    sleep. Pushes are collectives for a sharded actor: every rank calls ``generate`` together.
    The engine is registered in ``trainer.strategy.engines`` so the strategy's ``engines_sleep`` /
    ``engines_wake_up`` reach it. Times (``rollout/wake_s``, ``sync_s``, ``generate_s``,
    ``sleep_s``) and ``rollout/sync_bytes`` are logged, and kept in :attr:`stats`.

    Args:
        engine: the engine to drive; ``None`` builds one on each rank at fit start, filled by the first
            push, as the strategy's ``StrategyConfig`` says: ``engine_type="hf"`` (also without a LightRFT
            strategy): an :class:`HFEngine` from ``pl_module.<actor_attr>``'s config; ``"vllm"`` /
            ``"sglang"``: a :class:`VLLMEngine` / :class:`SGLangEngine` of the actor's Hugging Face
            directory with ``engine_tp_size`` and ``engine_mem_util``. With an engine given, those fields
            must keep their defaults.
        sleep_level: 1 (weights kept in CPU memory) or 2 (weights dropped, pushed before each rollout).
        bucket_bytes: the byte budget of one weight-streaming bucket.
        actor_attr: the attribute of the LightningModule holding the actor.
        pad_token_id, eos_token_id: for the built ``HFEngine`` (default: the actor's config); ``eos_token_id``
            also for a built ``VLLMEngine`` (default: the model directory's config and generation config).
        engine_kwargs: more arguments of the built ``VLLMEngine`` / ``SGLangEngine`` (e.g. ``max_model_len``,
            ``kv_cache_memory_bytes``, ``enforce_eager``; any ``vllm.LLM`` / ``sglang.Engine`` argument).
            The built vLLM engine's dtype is the generation dtype (bf16 under bf16 precision, else the actor's).
    """

    def __init__(self, engine: Optional[RolloutEngine] = None, sleep_level: int = 1, bucket_bytes: int = 64 << 20,
                 actor_attr: str = "actor", pad_token_id: Optional[int] = None,
                 eos_token_id: Optional[int | list[int]] = None, engine_kwargs: Optional[dict[str, Any]] = None) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"RolloutEngineCallback: bucket_bytes={bucket_bytes!r} is invalid; accepted: an integer >= 1")
        self.sleep_level = _check_level(sleep_level)
        self.engine = engine
        self._owns_engine = engine is None
        self.bucket_bytes = bucket_bytes
        self.actor_attr = actor_attr
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.engine_kwargs = dict(engine_kwargs or {})
        self.stats: dict[str, float] = {"pushes": 0, "bytes_pushed": 0}
        self._optimizer_steps = 0  # Lightning-shape steps (opt.step(), automatic optimization)
        self._pushed_version: Optional[int] = None

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.engine is None:
            self.engine = self._build_engine(trainer, pl_module)
        else:
            _check_engine_fields_unset(trainer, f"an engine was given ({type(self.engine).__name__})")
            if self.engine_kwargs:
                raise ValueError(f"RolloutEngineCallback: engine_kwargs={self.engine_kwargs!r} would be ignored: an engine "
                                 "was given; accepted: {} with engine=, or engine_kwargs without it")
        self._pushed_version = None
        engines = getattr(trainer.strategy, "engines", None)
        if engines is not None and self.engine not in engines:
            engines.append(self.engine)
        self._timed("sleep_s", self.engine.sleep, self.sleep_level)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        engines = getattr(trainer.strategy, "engines", None)
        if engines is not None and self.engine in engines:
            engines.remove(self.engine)
        if self._owns_engine:
            self.engine = None  # a new fit builds a fresh engine (and frees this one's memory)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._optimizer_steps += 1

    # ------------------------------------------------------------------ the rollout
    def generate(self, pl_module: LightningModule, prompt_token_ids: Sequence[Sequence[int]],
                 params: SamplingParams) -> list[Completion]:
        """Run one rollout with the actor's current weights; see the class docstring for the order."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("RolloutEngineCallback.generate: no engine yet; call it inside Trainer.fit "
                               "(the engine is built at fit start)")
        start = time.perf_counter()
        engine.wake_up(["weights"])
        wake_s = time.perf_counter() - start
        version = self._actor_version(pl_module.trainer)
        try:
            if version != self._pushed_version or not getattr(engine, "weights_valid", True):
                start = time.perf_counter()
                nbytes = push_weights(self._actor(pl_module), engine, self.bucket_bytes, dtype=engine.dtype)
                self.stats.update(sync_s=time.perf_counter() - start, sync_bytes=float(nbytes))
                self.stats["pushes"] += 1
                self.stats["bytes_pushed"] += nbytes
                self._pushed_version = version
            else:
                self.stats.update(sync_s=0.0, sync_bytes=0.0)
            self._timed("wake_s", engine.wake_up, ["kv_cache"])
            self.stats["wake_s"] += wake_s
            completions = self._timed("generate_s", engine.generate, prompt_token_ids, params)
        finally:
            self._timed("sleep_s", engine.sleep, self.sleep_level)
        self._log(pl_module)
        return completions

    # ------------------------------------------------------------------ helpers
    def _actor(self, pl_module: LightningModule) -> nn.Module:
        actor = getattr(pl_module, self.actor_attr, None)
        if not isinstance(actor, nn.Module):
            raise ValueError(f"RolloutEngineCallback: actor_attr={self.actor_attr!r} does not name a module of "
                             f"{type(pl_module).__name__}; accepted: the attribute holding the actor model")
        return hf_model(actor)

    def _build_engine(self, trainer: Trainer, pl_module: LightningModule) -> RolloutEngine:
        config = getattr(trainer.strategy, "config", None)
        engine_type = config.engine_type if isinstance(config, StrategyConfig) else "hf"
        if engine_type == "hf":
            _check_engine_fields_unset(trainer, "engine_type='hf' (the built-in HFEngine runs unsharded, in the "
                                       "trainer's memory)", ("engine_tp_size", "engine_mem_util"))
            if self.engine_kwargs:
                raise ValueError(f"RolloutEngineCallback: engine_kwargs={self.engine_kwargs!r} would be ignored: they are "
                                 "for engine_type 'vllm'/'sglang'; accepted: {} with engine_type='hf'")
            return self._build_hf_engine(pl_module, _generation_dtype(trainer))
        try:
            importlib.import_module(engine_type)
        except ImportError as err:
            raise ImportError(
                f"StrategyConfig.engine_type={engine_type!r} needs the {engine_type} package, which does not import "
                f"({err}); install it with `pip install 'lightrft-lightning[{engine_type}]'`, or use "
                f"engine_type='hf' (built in); accepted: {', '.join(map(repr, ENGINE_TYPES))}") from err
        path = self._actor(pl_module).config.name_or_path
        if not path or not os.path.isdir(path):
            raise ValueError(
                f"StrategyConfig.engine_type={engine_type!r} loads the actor's Hugging Face directory, but the actor's "
                f"config.name_or_path is {path!r}, not a local directory; accepted: an actor loaded from a local "
                "directory (model=<path>), engine_type='hf', or RolloutEngineCallback(engine=...)")
        if engine_type == "vllm":
            dtype = _generation_dtype(trainer) or next(self._actor(pl_module).parameters()).dtype
            kwargs = {"dtype": _VLLM_DTYPES.get(dtype, "auto"), "eos_token_id": self.eos_token_id, **self.engine_kwargs}
            return VLLMEngine(path, sleep_level=self.sleep_level, tensor_parallel_size=config.engine_tp_size,
                              gpu_memory_utilization=config.engine_mem_util, seed=config.seed, **kwargs)
        return SGLangEngine(path, sleep_level=self.sleep_level, tp_size=config.engine_tp_size,
                            mem_fraction_static=config.engine_mem_util, random_seed=config.seed,
                            **self.engine_kwargs)

    def _build_hf_engine(self, pl_module: LightningModule, dtype: Optional[torch.dtype] = None) -> HFEngine:
        actor = self._actor(pl_module)
        config = actor.config
        eos = self.eos_token_id if self.eos_token_id is not None else config.eos_token_id
        pad = self.pad_token_id
        if pad is None:
            pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
        dtype = dtype or next(actor.parameters()).dtype
        kwargs = dict(pad_token_id=pad or 0, eos_token_id=eos, sleep_level=self.sleep_level, device=pl_module.device)
        if not has_lora(actor) and all(_plain(p) and p.dtype == dtype and p.device == pl_module.device
                                       for p in actor.parameters()):
            # one process holds the whole actor in the engine's dtype: generate from its own tensors (no
            # second copy of the weights; the push after each step copies nothing); a LoRA actor's engine
            # holds the merged weights instead
            return HFEngine(actor, share_weights=True, **kwargs)
        return HFEngine.from_config(config, dtype=dtype, **kwargs)

    def _actor_version(self, trainer: Trainer) -> int:
        # LightRFT-shape steps are counted by the strategy, Lightning-shape ones by on_before_optimizer_step
        states = getattr(trainer.strategy, "_train_states", {})
        return self._optimizer_steps + sum(state.steps for state in states.values())

    def _timed(self, key: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        self.stats[key] = time.perf_counter() - start
        return out

    def _log(self, pl_module: LightningModule) -> None:
        keys = ("wake_s", "sync_s", "sync_bytes", "generate_s", "sleep_s")
        log.debug("rollout: %s", {k: self.stats.get(k) for k in keys})
        if not lightning_api.can_log(pl_module):
            return
        for key in keys:
            pl_module.log(f"rollout/{key}", float(self.stats.get(key, 0.0)))


def _plain(param: torch.Tensor) -> bool:
    """Neither an FSDP2 shard (DTensor) nor a DeepSpeed ZeRO-3 partition."""
    return not (hasattr(param, "full_tensor") or hasattr(param, "ds_id"))


def _generation_dtype(trainer: Trainer) -> Optional[torch.dtype]:
    """bf16 when training is bf16 (mixed or true): the engine generates in the precision the actor computes in."""
    return torch.bfloat16 if str(trainer.precision).startswith("bf16") else None


def _check_engine_fields_unset(trainer: Trainer, reason: str, fields: Sequence[str] = _ENGINE_FIELDS) -> None:
    """Refuse ``StrategyConfig`` engine fields that would be ignored (set away from their defaults)."""
    config = getattr(trainer.strategy, "config", None)
    if not isinstance(config, StrategyConfig):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(StrategyConfig)}
    for name in fields:
        if getattr(config, name) != defaults[name]:
            raise ValueError(f"StrategyConfig.{name}={getattr(config, name)!r} would be ignored: {reason}; "
                             f"accepted: {defaults[name]!r} here, or engine_type 'vllm'/'sglang' without engine=")


def hf_model(module: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``module``: unwraps DeepSpeed/DDP ``.module`` and LightRFT-style
    actors' ``.model``."""
    from transformers import PreTrainedModel

    current = module
    while not isinstance(current, PreTrainedModel):
        inner = getattr(current, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(current, "model", None)
        if not isinstance(inner, nn.Module):
            break
        current = inner
    if getattr(current, "config", None) is None:
        raise ValueError(f"RolloutEngineCallback: the actor ({type(module).__name__}) holds no Hugging Face model with "
                         "a config; pass engine=... or make the actor a transformers causal LM")
    return current


def find_rollout_callback(trainer: Trainer) -> RolloutEngineCallback:
    """The trainer's :class:`RolloutEngineCallback`, or a clear error when it has none."""
    for callback in trainer.callbacks:
        if isinstance(callback, RolloutEngineCallback):
            return callback
    raise RuntimeError("no RolloutEngineCallback in the Trainer's callbacks; add one: "
                       "Trainer(callbacks=[RolloutEngineCallback(...)]) (or trainer.callbacks in a LightningCLI config)")
