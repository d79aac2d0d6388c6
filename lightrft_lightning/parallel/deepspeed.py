"""DeepSpeed as plain functions over explicit arguments (no Lightning): the engine config built from a
``StrategyConfig``, a user's config merged over it, the clipping norm an engine steps with, ZeRO-3
partitions read straight from a pretrained checkpoint, and ZeRO-3 weights read back from a checkpoint.
``LightRFTDeepSpeed`` (under a Trainer and standalone) calls them. DeepSpeed's private names stay here."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from lightrft_lightning.config import StrategyConfig
from lightrft_lightning.parallel.deepspeed_loading import weights_only_loads
from lightrft_lightning.parallel.meta_init import pretrained_weights

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


def reads_pretrained_partitions(ds_config: dict[str, Any]) -> bool:
    """Whether :func:`load_pretrained_partitions` can build this config's partitions: not with hpZ
    (``zero_hpz_partition_size > 1``), quantized weights or parameters offloaded to NVMe, where DeepSpeed keeps
    a second copy of each partition (secondary, quantized, swapped out) that it fills from the whole parameter."""
    zero = ds_config.get("zero_optimization", {})
    offload = (zero.get("offload_param") or {}).get("device")
    return (zero.get("stage") == 3 and int(zero.get("zero_hpz_partition_size", 1)) <= 1
            and not zero.get("zero_quantized_weights") and not zero.get("zero_quantized_nontrainable_weights")
            and offload != "nvme")


def load_pretrained_partitions(model: nn.Module, ds_config: dict[str, Any]) -> None:
    """Turn every parameter of ``model`` into a ZeRO-3 partitioned one, as ``deepspeed.zero.Init(config)``
    would have built it (its dtype, device and partition group), without ever holding the whole model: a
    parameter on the meta device under a module marked with a checkpoint
    (:func:`~lightrft_lightning.parallel.meta_init.causal_lm_on_meta`) takes only this rank's flat range of its
    tensor, read from the safetensors; a real one (PPO's value head) is partitioned from its values, as
    ``zero.Init`` does. Shared (tied) parameters stay shared. The engine built on ``model`` then finds it
    partitioned (a "zero-init model") and leaves it as it is."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    init = deepspeed.zero.Init(config_dict_or_path=ds_config)
    sources = {id(param): (source.path, source.prefix + name) for sub in model.modules()
               if (source := pretrained_weights(sub)) is not None for name, param in sub.named_parameters()}
    new: dict[int, nn.Parameter] = {}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        readers = {path: stack.enter_context(SafetensorsRanges(path)) for path, _ in sources.values()}
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None or is_zero_param(param):
                    continue
                if id(param) not in new:
                    if param.is_meta and id(param) not in sources:
                        raise ValueError(f"load_pretrained_partitions: {type(module).__name__}.{name} is on the meta "
                                         "device and no checkpoint is marked for it; accepted: parameters that are real "
                                         "or under a module built by causal_lm_on_meta")
                    path, key = sources.get(id(param), (None, ""))
                    new[id(param)] = _partitioned(init, param, readers.get(path), key)
                module._parameters[name] = new[id(param)]
    # the rest of what zero.Init(module=model) does (all its parameters are partitioned now, it converts none):
    # the buffers a model names for fp32 stay in fp32, and DeepSpeed's memory-efficient F.linear replaces
    # torch's for the process, as when an engine partitions a model itself (the same numbers either way)
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)


def _partitioned(init: Any, param: nn.Parameter, reader: Optional[SafetensorsRanges], key: str) -> nn.Parameter:
    """A ZeRO-3 parameter of ``param``'s shape: partitioned from ``param``'s values (broadcast from rank 0 first,
    as ``zero.Init``), or, for a meta ``param``, its partition filled with this rank's range of ``reader``'s
    tensor ``key``."""
    if not param.is_meta:
        out = nn.Parameter(param.detach().to(init.local_device, init.dtype), requires_grad=param.requires_grad)
        init._zero_init_param(out)
        return out
    # uninitialized and never read as a whole: the pages of the full tensor are not touched, only the range
    # that partition() copies (then overwritten), and partition() frees it
    out = nn.Parameter(torch.empty(param.shape, dtype=init.dtype, device=init.local_device),
                       requires_grad=param.requires_grad)
    init._convert_to_deepspeed_param(out)
    out.partition()
    assert reader is not None
    part = out.ds_tensor
    start = part.numel() * out.ds_zero_partition_rank
    count = max(0, min(part.numel(), out.ds_numel - start))
    part.narrow(0, 0, count).copy_(reader.flat_range(key, tuple(param.shape), start, count))
    part.narrow(0, count, part.numel() - count).zero_()  # padding of the last partition
    return out


class SafetensorsRanges(contextlib.AbstractContextManager):
    """The tensors of a Hugging Face checkpoint directory (``model.safetensors`` or an indexed set of shards),
    read a flat element range at a time; each file is opened once, and closed when the context ends."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self.path, self._open = path, contextlib.ExitStack()
        index = Path(path) / "model.safetensors.index.json"
        names = json.loads(index.read_text())["weight_map"] if index.is_file() else None
        if names is None and not (Path(path) / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} holds no model.safetensors nor model.safetensors.index.json; accepted: "
                                    "a Hugging Face checkpoint directory saved with safetensors")
        handles: dict[str, Any] = {}
        for file in sorted(set(names.values())) if names else ["model.safetensors"]:
            handles[file] = self._open.enter_context(safe_open(str(Path(path) / file), framework="pt"))
        self._handles = {name: handles[file] for name, file in names.items()} if names else dict.fromkeys(
            handles["model.safetensors"].keys(), handles["model.safetensors"])

    def __exit__(self, *exc: Any) -> None:
        self._open.close()

    def flat_range(self, name: str, shape: tuple[int, ...], start: int, count: int) -> torch.Tensor:
        """Elements ``[start, start + count)`` of tensor ``name`` flattened (row-major), reading only the rows
        that hold them; the tensor must have ``shape``."""
        if name not in self._handles:
            raise ValueError(f"load_pretrained_partitions: {self.path} has no weight {name!r}; accepted: a checkpoint "
                             "of the model's own config")
        rows = self._handles[name].get_slice(name)
        if tuple(rows.get_shape()) != shape:
            raise ValueError(f"load_pretrained_partitions: {self.path} has {name!r} of shape "
                             f"{tuple(rows.get_shape())}, the model {shape}; accepted: a checkpoint of the model's own config")
        if count == 0:
            return torch.empty(0)
        if len(shape) == 0:
            return rows[...].reshape(1)
        row = max(1, int(torch.Size(shape[1:]).numel()))
        first, last = start // row, -(-(start + count) // row)
        return rows[first:last].reshape(-1).narrow(0, start - first * row, count)
