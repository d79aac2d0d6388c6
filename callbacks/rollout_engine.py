"""`RolloutEngineCallback`: owns a rollout engine during ``Trainer.fit`` and runs each rollout's
wake -> push -> generate -> sleep cycle."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightrft_lightning import lightning_api
from lightrft_lightning.config import StrategyConfig
from lightrft_lightning.engines.base import Completion, RolloutEngine, SamplingParams, check_sleep_level
from lightrft_lightning.engines.build import (
    EngineConfig,
    build_engine,
    check_bucket_bytes,
    engine_config,
    refuse_ignored_fields,
)
from lightrft_lightning.engines.memory import pending_optimizer_bytes
from lightrft_lightning.engines.sleep import sleep_engines, wake_engines
from lightrft_lightning.engines.weight_sync import push_weights

log = logging.getLogger(__name__)


class RolloutEngineCallback(Callback):
    """Keeps a rollout engine asleep while the actor trains and awake only for rollouts.

    ``generate`` wakes the weights, pushes the actor's weights when an optimizer stepped since the
    last push (or the engine lost them), wakes the KV cache, generates and puts the engine back to
    sleep. Pushes are collectives for a sharded actor: every rank calls ``generate`` together.
    The engine is registered in ``trainer.strategy.engines`` so the strategy's ``engines_sleep`` /
    ``engines_wake_up`` reach it. Times (``rollout/wake_s``, ``sync_s``, ``generate_s``,
    ``sleep_s``) and ``rollout/sync_bytes`` are logged, and kept in :attr:`stats`.

    Args:
        engine: the engine to drive; ``None`` builds one on each rank at fit start with
            :func:`~lightrft_lightning.engines.build.build_engine`, filled by the first push, as the
            strategy's ``StrategyConfig`` says: ``engine_type="hf"`` (also without a LightRFT strategy): an
            :class:`HFEngine` from ``pl_module.<actor_attr>``'s config; ``"vllm"`` / ``"sglang"``: a
            :class:`VLLMEngine` / :class:`SGLangEngine` of the actor's Hugging Face directory with
            ``engine_tp_size`` and ``engine_mem_util``; ``"vllm_server"``: a :class:`VLLMServerEngine` over the
            servers ``engine_kwargs={"urls": [...]}`` names (``lightrft-lightning serve``). With an engine
            given, those fields must keep their defaults. The built engine generates in the dtype the actor computes in (bf16 under a bf16
            precision, else the actor's).
        sleep_level: 1 (weights kept in CPU memory) or 2 (weights dropped, pushed before each rollout);
            ``None``: ``StrategyConfig.engine_sleep_level``, else a given engine's own level, else the
            engine type's (2 for vLLM/SGLang, whose weights are pushed before each rollout after a step;
            1 for the HF engine). With ``enable_engine_sleep=False`` the engine stays awake.
        bucket_bytes: the byte budget of one weight-streaming bucket (default 256 MiB).
        actor_attr: the attribute of the LightningModule holding the actor.
        pad_token_id, eos_token_id: for the built ``HFEngine`` (default: the actor's config); ``eos_token_id``
            also for a built ``VLLMEngine`` (default: the model directory's config and generation config).
        engine_kwargs: more arguments of the built ``VLLMEngine`` / ``SGLangEngine`` (e.g. ``max_model_len``,
            ``kv_cache_memory_bytes``, ``enforce_eager``; any ``vllm.LLM`` / ``sglang.Engine`` argument).
    """

    def __init__(self, engine: Optional[RolloutEngine] = None, sleep_level: Optional[int] = None,
                 bucket_bytes: Optional[int] = None, actor_attr: str = "actor", pad_token_id: Optional[int] = None,
                 eos_token_id: Optional[int | list[int]] = None, engine_kwargs: Optional[dict[str, Any]] = None) -> None:
        if bucket_bytes is not None:
            check_bucket_bytes(bucket_bytes)
        if sleep_level is not None:
            check_sleep_level(sleep_level)
        self.sleep_level = sleep_level
        self.engine = engine
        self._owns_engine = engine is None
        self.bucket_bytes = bucket_bytes
        self.actor_attr = actor_attr
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.engine_kwargs = dict(engine_kwargs or {})
        self.engine_config: Optional[EngineConfig] = None  # derived at fit start from the strategy's config
        self.stats: dict[str, float] = {"pushes": 0, "bytes_pushed": 0}
        self._optimizer_steps = 0  # Lightning-shape steps (opt.step(), automatic optimization)
        self._pushed_version: Optional[int] = None

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.engine is None:
            self.engine = self._build_engine(trainer, pl_module)
        else:
            refuse_ignored_fields(getattr(trainer.strategy, "config", None),
                                  f"an engine was given ({type(self.engine).__name__})")
            if self.engine_kwargs:
                raise ValueError(f"RolloutEngineCallback: engine_kwargs={self.engine_kwargs!r} would be ignored: an engine "
                                 "was given; accepted: {} with engine=, or engine_kwargs without it")
            # set nowhere else, the sleep level is the one the given engine was built with
            self.engine_config = self._engine_config(trainer, getattr(self.engine, "sleep_level", None))
        self._pushed_version = None
        engines = getattr(trainer.strategy, "engines", None)
        if engines is not None and self.engine not in engines:
            engines.append(self.engine)
        self._timed("sleep_s", sleep_engines, [self.engine], self.engine_config.sleep_level)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        engines = getattr(trainer.strategy, "engines", None)
        if engines is not None and self.engine in engines:
            engines.remove(self.engine)
        if self._owns_engine:
            close = getattr(self.engine, "close", None)
            if callable(close):  # a server engine's threads and connections
                close()
            self.engine = None  # a new fit builds a fresh engine (and frees this one's memory)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._optimizer_steps += 1

    # ------------------------------------------------------------------ the rollout
    def generate(self, pl_module: LightningModule, prompt_token_ids: Sequence[Sequence[int]],
                 params: SamplingParams) -> list[Completion]:
        """Run one rollout with the actor's current weights; see the class docstring for the order."""
        engine, config = self.engine, self.engine_config
        if engine is None or config is None:
            raise RuntimeError("RolloutEngineCallback.generate: no engine yet; call it inside Trainer.fit "
                               "(the engine is built at fit start)")
        start = time.perf_counter()
        wake_engines([engine], ["weights"], mem_util=_device_budget(engine, config))
        wake_s = time.perf_counter() - start
        try:
            self._push_if_changed(pl_module)
            self._timed("wake_s", wake_engines, [engine], ["kv_cache"])
            self.stats["wake_s"] += wake_s
            completions = self._timed("generate_s", engine.generate, prompt_token_ids, params)
        finally:
            self._timed("sleep_s", sleep_engines, [engine], config.sleep_level)
        self._log(pl_module)
        return completions

    def sync_weights(self, pl_module: LightningModule) -> None:
        """Push the actor's weights to an engine on devices of its own (a server) if an optimizer stepped
        since the last push, without generating: the asynchronous rollout's push, in the main thread (a
        sharded actor's push is a collective), while its producer thread generates between pushes."""
        if self.engine is None or self.engine_config is None:
            raise RuntimeError("RolloutEngineCallback.sync_weights: no engine yet; call it inside Trainer.fit")
        self._push_if_changed(pl_module)

    def _push_if_changed(self, pl_module: LightningModule) -> None:
        engine, config = self.engine, self.engine_config
        version = self._actor_version(pl_module.trainer)
        if version != self._pushed_version or not getattr(engine, "weights_valid", True):
            start = time.perf_counter()
            engine.tag_weight_version(pl_module.trainer.global_step)  # the learner's step
            nbytes = push_weights(self._actor(pl_module), engine, config.bucket_bytes, dtype=engine.dtype)
            self.stats.update(sync_s=time.perf_counter() - start, sync_bytes=float(nbytes))
            self.stats["pushes"] += 1
            self.stats["bytes_pushed"] += nbytes
            self._pushed_version = version
        else:
            self.stats.update(sync_s=0.0, sync_bytes=0.0)

    # ------------------------------------------------------------------ helpers
    def _actor(self, pl_module: LightningModule) -> nn.Module:
        actor = getattr(pl_module, self.actor_attr, None)
        if not isinstance(actor, nn.Module):
            raise ValueError(f"RolloutEngineCallback: actor_attr={self.actor_attr!r} does not name a module of "
                             f"{type(pl_module).__name__}; accepted: the attribute holding the actor model")
        return hf_model(actor)

    def _engine_config(self, trainer: Trainer, fallback_sleep_level: Optional[int] = None) -> EngineConfig:
        """The strategy's ``StrategyConfig`` (if it has one) with this callback's settings, under the
        Trainer's precision."""
        config = getattr(trainer.strategy, "config", None)
        return engine_config(config if isinstance(config, StrategyConfig) else None, str(trainer.precision),
                             sleep_level=self.sleep_level, fallback_sleep_level=fallback_sleep_level,
                             bucket_bytes=self.bucket_bytes, pad_token_id=self.pad_token_id,
                             eos_token_id=self.eos_token_id, engine_kwargs=self.engine_kwargs)

    def _build_engine(self, trainer: Trainer, pl_module: LightningModule) -> RolloutEngine:
        """The engine ``on_fit_start`` builds (one process holding the whole actor in the generation
        dtype: an ``HFEngine`` over the actor's own tensors, with no second copy to push into)."""
        self.engine_config = self._engine_config(trainer)
        if self.engine_config.engine_type == "hf":  # (the LightRFT calls' engine groups do read engine_tp_size)
            refuse_ignored_fields(getattr(trainer.strategy, "config", None), "engine_type='hf' (the built-in HFEngine "
                                  "runs unsharded, in the trainer's memory)", ("engine_tp_size", "engine_mem_util"))
        # a PyTorch optimizer allocates its state at the first step, after the engine is built: count it now
        return build_engine(self.engine_config, self._actor(pl_module), device=pl_module.device, share_weights=True,
                            pending_bytes=pending_optimizer_bytes(trainer.optimizers))

    def _actor_version(self, trainer: Trainer) -> int:
        # LightRFT-shape steps are counted by the strategy, Lightning-shape ones by on_before_optimizer_step
        return self._optimizer_steps + getattr(trainer.strategy, "optimizer_steps", 0)

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


def _device_budget(engine: RolloutEngine, config: EngineConfig) -> Optional[float]:
    """The memory fraction a waking engine maps again (vLLM/SGLang; the HF engine lives in PyTorch's memory,
    a server's engine on devices of its own)."""
    from lightrft_lightning.engines.hf import HFEngine
    from lightrft_lightning.engines.server import VLLMServerEngine

    return None if isinstance(engine, (HFEngine, VLLMServerEngine)) else config.mem_util


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
