"""LoRA adapters on a Hugging Face causal LM (built with ``peft``), the reference policy as the
same base with the adapters off, and the merged weights (base + scaled adapter product) that the
rollout engines and the merged export get."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

ADAPTER = "default"  # peft's name of the one adapter this package trains
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TIED_MODULES = ("lm_head", "embed_tokens")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRASettings:
    """``lora: {r, alpha, dropout, target_modules}``: rank, scale numerator (the adapter product is
    scaled by ``alpha / r``), dropout on the adapter input, and the names of the linear layers that
    get adapters (default: the attention and MLP projections)."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    @classmethod
    def parse(cls, value: Any, owner: str) -> Optional["LoRASettings"]:
        """``None`` (no LoRA), or the validated settings of a ``lora`` mapping."""
        if value is None:
            return None
        if isinstance(value, LoRASettings):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{owner}.lora={value!r} is invalid; accepted: None or a mapping with keys "
                             f"{', '.join(LORA_KEYS)}")
        unknown = sorted(set(value) - set(LORA_KEYS))
        if unknown:
            raise ValueError(f"{owner}.lora has unknown keys {unknown}; accepted: {', '.join(LORA_KEYS)}")
        r = value.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{owner}.lora.r={r!r} is invalid; accepted: an integer >= 1")
        alpha = value.get("alpha", r)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
            raise ValueError(f"{owner}.lora.alpha={alpha!r} is invalid; accepted: a number > 0")
        dropout = value.get("dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{owner}.lora.dropout={dropout!r} is invalid; accepted: a number in [0, 1)")
        targets = value.get("target_modules", DEFAULT_TARGETS)
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"{owner}.lora.target_modules={targets!r} is invalid; accepted: a non-empty list of "
                             "module names (e.g. ['q_proj', 'v_proj'])")
        return cls(r=r, alpha=float(alpha), dropout=float(dropout), target_modules=tuple(targets))

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM")


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"lora=... needs the peft package ({err}); install it with "
                          "`pip install 'lightrft-lightning[lora]'`, or use lora=None") from err
    return peft


def apply_lora(model: nn.Module, settings: LoRASettings, owner: str) -> nn.Module:
    """Inject adapters into ``model`` in place (its class and names of untouched modules stay); only
    the adapter parameters stay trainable."""
    peft = _peft()
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = sorted(set(settings.target_modules) - leaves)
    if missing:
        raise ValueError(f"{owner}.lora.target_modules names {missing}, which are not linear layers of "
                         f"{type(model).__name__}; accepted: {', '.join(sorted(leaves))}")
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and set(settings.target_modules) & set(_TIED_MODULES):
        raise ValueError(f"{owner}.lora.target_modules={list(settings.target_modules)!r} adapts a tied embedding "
                         f"({', '.join(_TIED_MODULES)}), which a merge would untie; accepted: the projections inside "
                         "the decoder layers")
    return peft.inject_adapter_in_model(settings.peft_config(), model)


def base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft ``PeftModel`` (adapters injected), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` of each peft LoRA layer in ``model``."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base: the reference policy of a LoRA actor, without a second copy."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def frozen_base_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the frozen parameters inside ``module``'s LoRA-adapted children (the bases,
    rebuilt from their model at construction): what its checkpoints leave out."""
    keys = set()
    for child_name, child in module.named_children():
        if has_lora(child):
            keys.update(f"{child_name}.{name}" for name, p in child.named_parameters(remove_duplicate=False)
                        if not p.requires_grad)
    return keys


# ---------------------------------------------------------------------- merged weights
_BASE, _A, _B = ".base_layer.", f".lora_A.{ADAPTER}.", f".lora_B.{ADAPTER}."


def lora_group(name: str) -> Optional[str]:
    """The LoRA layer a parameter belongs to (its base weight, bias, A and B), else None."""
    for marker in (_BASE, _A, _B):
        if marker in name:
            return name.split(marker, 1)[0]
    return None


def lora_scalings(model: nn.Module, rename: Any = lambda n: n) -> dict[str, float]:
    """``{layer name: alpha / r}`` of the adapters of ``model`` (names passed through ``rename``)."""
    scalings = {}
    for name, layer in lora_layers(model):
        if getattr(layer, "fan_in_fan_out", False):
            raise ValueError(f"LoRA layer {name} is fan_in_fan_out (Conv1D); accepted: nn.Linear targets")
        scalings[rename(name)] = float(layer.scaling[ADAPTER])
    return scalings


def merge_lora(tensors: list[tuple[str, torch.Tensor]], scalings: dict[str, float],
               dtype: Optional[torch.dtype] = None) -> list[tuple[str, torch.Tensor]]:
    """Full tensors ``(name, tensor)`` -> the same with each LoRA layer merged under its base names:
    ``W + (B @ A) * scaling`` (peft's merge, computed out of place), then cast to ``dtype``. A layer's
    base weight, A and B must be in ``tensors`` together."""
    by_name = dict(tensors)
    out = []
    for name, tensor in tensors:
        group = lora_group(name)
        if group is None or group not in scalings:
            out.append((name, tensor if dtype is None else tensor.to(dtype)))
            continue
        if _A in name or _B in name:
            continue
        if name == group + _BASE + "weight":
            a, b = by_name[group + _A + "weight"], by_name[group + _B + "weight"]
            tensor = tensor + (b.to(tensor.dtype) @ a.to(tensor.dtype)) * scalings[group]
        out.append((name.replace(_BASE, "."), tensor if dtype is None else tensor.to(dtype)))
    return out


# ---------------------------------------------------------------------- adapter files
def save_adapter(model: nn.Module, state: dict[str, torch.Tensor], output_dir: str) -> None:
    """Write a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) from
    ``model``'s full state dict ``state``: what ``PeftModel.from_pretrained`` loads."""
    peft = _peft()
    from safetensors.torch import save_file

    if isinstance(model, peft.PeftModel):  # LightRFT-style code wraps its actor with get_peft_model
        model.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
        return
    config = _adapter_config(model)
    config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None)
    adapter = peft.get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER)
    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    # keyed as a PeftModel saves them (its wrappers' prefix), so PeftModel.from_pretrained loads them
    save_file({_PEFT_PREFIX + k: v.contiguous() for k, v in adapter.items()},
              os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


def _adapter_config(model: nn.Module) -> Any:
    config = getattr(model, "peft_config", {}).get(ADAPTER)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter; accepted: a model built with lora=...")
    return config

