"""DeepSpeed as plain functions over explicit arguments (no Lightning): the engine config built from a
``StrategyConfig``, a user's config merged over it, the clipping norm an engine steps with, and ZeRO-3
weights read back from a checkpoint. ``LightRFTDeepSpeed`` (under a Trainer and standalone) calls them."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, Iterator, Union

import torch
import torch.distributed as dist

from lightrft_lightning.config import StrategyConfig
from lightrft_lightning.parallel.deepspeed_loading import weights_only_loads

FP16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
        "min_loss_scale": 1}


def build_config(config: StrategyConfig, precision: str, accumulation_steps: int, user_config: dict[str, Any],
                 train: bool = True) -> dict[str, Any]:
    """The DeepSpeed config of a training engine (``train``) or an inference engine (ZeRO-3 if training uses
    it, else stage 0: ZeRO-1/2 engines need an optimizer), trained in ``precision`` ("bf16", "fp16" or
    "fp32"), with ``user_config`` merged over it (its values win)."""
    c = config
    zero: dict[str, Any] = {"stage": c.zero_stage, "overlap_comm": c.overlap_comm}
    if c.zero_stage == 3 and c.zpg > 1:
        zero["zero_hpz_partition_size"] = c.zpg
    if c.adam_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": c.micro_train_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": c.max_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = dict(FP16)
    if c.grad_accum_dtype is not None:
        cfg["data_types"] = {"grad_accum_dtype": c.grad_accum_dtype}
    cfg = merge(cfg, user_config)
    if not train:
        zero = {k: v for k, v in cfg["zero_optimization"].items() if k != "offload_optimizer"}
        zero["stage"] = 3 if zero.get("stage") == 3 else 0
        cfg = {k: v for k, v in cfg.items() if k not in ("optimizer", "scheduler", "gradient_accumulation_steps")}
        cfg["zero_optimization"] = zero
    return cfg


def load_user_config(ds_config: Union[dict, str, Path, None]) -> dict[str, Any]:
    """A user's DeepSpeed config: a dict (copied), a JSON file path, or None (``{}``)."""
    if ds_config is None:
        return {}
    if isinstance(ds_config, dict):
        return copy.deepcopy(ds_config)
    if isinstance(ds_config, (str, Path)):
        if not os.path.isfile(ds_config):
            raise FileNotFoundError(f"LightRFTDeepSpeed: ds_config={str(ds_config)!r} is not a file; accepted: a dict or a JSON file path")
        with open(ds_config) as f:
            try:
                loaded = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"LightRFTDeepSpeed: ds_config={str(ds_config)!r} is not valid JSON ({err}); "
                                 "accepted: a dict or a JSON file path") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"LightRFTDeepSpeed: ds_config={str(ds_config)!r} holds a {type(loaded).__name__}, "
                             "not a JSON object; accepted: a dict or a JSON file path")
        return loaded
    raise TypeError(f"LightRFTDeepSpeed: ds_config must be a dict, a JSON file path or None, got {type(ds_config).__name__}")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged over ``base``, nested dicts key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_gradient_clipping(engine: Any, max_norm: float) -> None:
    """Set the norm ``engine.step()`` clips to: stage 0 reads the engine's config, the ZeRO and bf16
    optimizers their own ``clip_grad``."""
    engine._config.gradient_clipping = max_norm
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = max_norm


def load_zero3_weights(engine: Any, load_dir: str, tag: str) -> str:
    """ZeRO-3 keeps the weights of a checkpoint in its optimizer shards, which DeepSpeed's
    ``load_module_only`` does not read: rebuild them with ``zero_to_fp32`` and copy them in."""
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        state = get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.get_rank() == 0:
                param.data.copy_(state[name])
    engine.optimizer._restore_from_bit16_weights()  # the fp32 master partitions follow the new weights
    return str(Path(load_dir) / tag)


def engine_build_order(children: list[tuple[str, Any]], trained: Any) -> list[tuple[str, Any]]:
    """The order to build engines for ``children`` (``(name, module)``; ``trained``: the names an optimizer
    trains): frozen children first, in their order, then the trained ones. A frozen reference made as a
    view of the actor's tensors (GRPO's) is then partitioned or converted while the actor still holds the
    full tensors, before the actor's engine allocates its optimizer state: the full weights never coexist
    with that state twice (once for the actor, once for the reference). The same order on every rank."""
    return [c for c in children if c[0] not in trained] + [c for c in children if c[0] in trained]


@contextlib.contextmanager
def zero3_init(ds_config: dict[str, Any]) -> Iterator[None]:
    """Build models partitioned from the start under ZeRO-3: ``deepspeed.zero.Init`` partitions each
    parameter over the ranks as it is created, and transformers' ``from_pretrained``, which reads
    ``HfDeepSpeedConfig`` while it lives, loads each weight into its partitions (gathered one at a time,
    filled from the checkpoint, re-partitioned) instead of a whole copy of the model per rank."""
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    marker = HfDeepSpeedConfig(ds_config)  # transformers holds it through a weak reference
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        unset_hf_deepspeed_config()
        del marker
