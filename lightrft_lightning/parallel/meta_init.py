"""Meta-device construction and its materialization: build a model's parameters on the meta device
(no memory), then give them the weights the same construction gives without it, bit for bit.

Plain functions over explicit arguments, no Lightning: the strategies' ``tensor_init_context`` /
``setup`` and LightRFT's ``init_model_context`` / ``prepare`` both call them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


def _is_hf_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


_INIT_STATE = "_lightrft_init_state"  # a module attribute: how it was being built (see parameters_on_meta)


@dataclass(frozen=True)
class _InitState:
    """The RNG state, default dtype and default device when a module's construction began (``order``:
    the how-many-th module built under the context)."""

    order: int
    cpu_rng: torch.Tensor
    cuda_rng: Optional[torch.Tensor]
    dtype: torch.dtype
    device: torch.device


def _current_init_state() -> _InitState:
    device = torch.get_default_device()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return _InitState(next(_INIT_ORDER), torch.get_rng_state(), cuda, torch.get_default_dtype(), device)


_INIT_ORDER = itertools.count()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create module parameters on the meta device; buffers (rotary tables...) stay real. Each module
    built inside records the RNG state, default dtype and device its construction began with, so that
    :func:`materialize_meta` can give it the weights a normal construction would have given."""
    original_register, original_init = nn.Module.register_parameter, nn.Module.__init__

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original_register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def init(module: nn.Module, *args: Any, **kwargs: Any) -> None:
        state = _current_init_state()
        original_init(module, *args, **kwargs)
        if _INIT_STATE not in module.__dict__:  # the outermost __init__ of the module's classes
            module.__dict__[_INIT_STATE] = state

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    nn.Module.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original_register  # type: ignore[method-assign]
        nn.Module.__init__ = original_init  # type: ignore[method-assign]


_PRETRAINED = "_lightrft_pretrained"  # a module attribute: the checkpoint its meta parameters take their weights from


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a module built on the meta device takes its weights from: the Hugging Face directory ``path``,
    whose safetensors name the module's parameter ``name`` ``prefix + name``."""

    path: str
    prefix: str = ""


def set_pretrained_weights(module: nn.Module, source: PretrainedWeights) -> None:
    """Mark ``module`` (parameters on the meta device) to take its weights from ``source`` when materialized."""
    module.__dict__[_PRETRAINED] = source


def pretrained_weights(module: nn.Module) -> Optional[PretrainedWeights]:
    """The checkpoint ``module``'s meta parameters take their weights from (:func:`set_pretrained_weights`), or None."""
    return module.__dict__.get(_PRETRAINED)


def causal_lm_on_meta(path: str) -> nn.Module:
    """The causal LM of the Hugging Face directory ``path``, in fp32, with its parameters on the meta device (no
    memory; buffers such as rotary tables are real) and marked to take the checkpoint's weights when it is
    materialized (:func:`materialize_meta`: the weights ``from_pretrained`` gives) or sharded (each rank reads
    its own rows: :func:`~lightrft_lightning.parallel.fsdp2.load_pretrained_shards`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    try:  # as from_pretrained does
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    set_pretrained_weights(model, PretrainedWeights(path))
    return model


def has_meta(module: nn.Module) -> bool:
    """Whether ``module`` has a parameter on the meta device."""
    return any(p.is_meta for p in module.parameters())


def materialize_meta(model: nn.Module, device: torch.device, seed: int, leave_pretrained: bool = False) -> None:
    """Replace meta parameters with real ones on ``device`` (shared parameters stay shared), initialized
    as a normal construction would have initialized them; a module marked with :func:`set_pretrained_weights`
    (:func:`causal_lm_on_meta`) takes its checkpoint's weights instead, unless ``leave_pretrained`` leaves it
    on the meta device (to be sharded first). Frozen modules marked with the same checkpoint share its
    tensors with the first trainable one (as :func:`~lightrft_lightning.algorithms.models.frozen_view` does).

    A model built under :func:`parameters_on_meta` (``init_model_context(meta_init=True)``,
    ``trainer.init_module(empty_init=True)``) replays its construction: its modules in the order they
    were built, on the RNG stream, default dtype and device that construction had; a Hugging Face
    model is built again from its config and its weights are taken over, any other module reruns its
    ``reset_parameters``. The weights are then bit for bit those of the same code run without meta
    init (the same seed gives the same weights on every rank), except that the meta build did not
    advance the global RNG. A model put on the meta device otherwise (no record) is initialized as
    before: the Hugging Face ``_init_weights`` (else each module's ``reset_parameters``) under ``seed``.
    """
    if not has_meta(model):
        return
    _materialize_replay(model, device, seed, {}, leave_pretrained)


def _empty_params(module: nn.Module, device: torch.device, new: dict[int, nn.Parameter]) -> set[int]:
    """Give ``module``'s own meta parameters uninitialized storage on ``device``; returns the new ones' ids."""
    made = set()
    for name, param in list(module._parameters.items()):
        if param is None or not param.is_meta:
            continue
        if id(param) not in new:
            new[id(param)] = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
            made.add(id(new[id(param)]))
        module._parameters[name] = new[id(param)]
    return made


def _materialize_with_seed(model: nn.Module, device: torch.device, seed: int, new: dict[int, nn.Parameter],
                           left: set[int]) -> None:
    fresh: set[int] = set()
    for module in model.modules():
        if id(module) not in left:
            fresh |= _empty_params(module, device, new)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(model, "_init_weights") and _is_hf_model(model):
            for module in model.modules():
                if any(id(p) in fresh for p in module.parameters(recurse=False)):
                    model._init_weights(module)
            if hasattr(model, "tie_weights"):
                model.tie_weights()
        else:
            for module in model.modules():
                if hasattr(module, "reset_parameters") and any(id(p) in fresh for p in module.parameters(recurse=False)):
                    module.reset_parameters()


@contextlib.contextmanager
def _replaying(state: _InitState) -> Iterator[None]:
    """Run code with the default dtype and device a module's construction began with."""
    dtype = torch.get_default_dtype()
    with torch.device(state.device):
        torch.set_default_dtype(state.dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)


def _rebuild_hf(module: nn.Module, state: _InitState, device: torch.device, new: dict[int, nn.Parameter]) -> None:
    """Build the Hugging Face model again from its config as its construction began, and take over the
    weights of its meta parameters (by name and shape); the others are left to the caller."""
    try:
        with _replaying(state):
            rebuilt = type(module)(module.config)  # consumes the RNG stream as the first construction did
    except Exception as err:  # a model class that cannot be built from its config alone
        log.warning("materialize: %s could not be rebuilt from its config (%s); its own init runs instead",
                    type(module).__name__, err)
        return
    weights = dict(rebuilt.named_parameters(remove_duplicate=False))
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for name, param in list(sub._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in new:
                source = weights.get(f"{prefix}.{name}" if prefix else name)
                if source is None or source.shape != param.shape:
                    continue
                new[id(param)] = nn.Parameter(source.detach().to(device=device, dtype=param.dtype),
                                              requires_grad=param.requires_grad)
            sub._parameters[name] = new[id(param)]


def _take_pretrained(module: nn.Module, source: PretrainedWeights, device: torch.device, new: dict[int, nn.Parameter],
                     checkpoints: dict[str, dict[str, torch.Tensor]], trained: set[int]) -> None:
    """Give ``module``'s meta parameters the weights of ``source`` (loaded once per materialization: a
    memory-mapped ``from_pretrained``); a trainable parameter never shares a tensor with another trainable one."""
    from transformers import AutoModelForCausalLM

    if source.path not in checkpoints:
        loaded = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        checkpoints[source.path] = dict(loaded.named_parameters(remove_duplicate=False))
    weights = checkpoints[source.path]
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for name, param in list(sub._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in new:
                key = source.prefix + (f"{prefix}.{name}" if prefix else name)
                weight = weights.get(key)
                if weight is None or weight.shape != param.shape:
                    raise ValueError(f"materialize: {source.path} has no weight {key!r} of shape {tuple(param.shape)} "
                                     f"for {type(module).__name__}; accepted: a checkpoint of the model's own config")
                tensor = weight.detach().to(device=device, dtype=param.dtype)
                if param.requires_grad:
                    if id(weight) in trained:
                        tensor = tensor.clone()
                    trained.add(id(weight))
                new[id(param)] = nn.Parameter(tensor, requires_grad=param.requires_grad)
            sub._parameters[name] = new[id(param)]


def _materialize_replay(model: nn.Module, device: torch.device, seed: int, new: dict[int, nn.Parameter],
                        leave_pretrained: bool = False) -> None:
    """Replay the construction of ``model``'s modules in the order they were built, on one RNG stream as
    a normal construction consumes it: each module continues the stream of the one built before it,
    unless the RNG changed between their constructions (a reseed, e.g. a factory's ``manual_seed``),
    in which case it starts from its own recorded state."""
    left = {id(m) for p in model.modules() if leave_pretrained and pretrained_weights(p) is not None
            for m in p.modules()}
    modules = [m for m in model.modules() if getattr(m, _INIT_STATE, None) is not None and id(m) not in left]
    modules.sort(key=lambda m: getattr(m, _INIT_STATE).order)
    owners = {id(m): m for m in modules if _is_hf_model(m)}
    checkpoints: dict[str, dict[str, torch.Tensor]] = {}
    trained: set[int] = set()
    previous: Optional[torch.Tensor] = None
    with torch.random.fork_rng(devices=[]):
        for module in modules:
            if not has_meta(module):
                continue
            source = pretrained_weights(module)
            if source is not None:
                _take_pretrained(module, source, device, new, checkpoints, trained)
                continue
            state = getattr(module, _INIT_STATE)
            if previous is None or not torch.equal(state.cpu_rng, previous):
                torch.set_rng_state(state.cpu_rng)
            previous = state.cpu_rng
            if id(module) in owners:
                _rebuild_hf(module, state, device, new)
            if any(p is not None and p.is_meta for p in module._parameters.values()):
                _empty_params(module, device, new)
                owner = next((o for o in owners.values() if any(m is module for m in o.modules())), None)
                with _replaying(state):
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
                    elif owner is not None and hasattr(owner, "_init_weights"):
                        owner._init_weights(module)
                    else:
                        raise TypeError(f"materialize: {type(module).__name__} has meta parameters and no "
                                        "reset_parameters, so its initialization cannot be replayed; accepted: modules "
                                        "with reset_parameters, Hugging Face models, or building it without meta/empty init")
    if any(p.is_meta for m in model.modules() if id(m) not in left for p in m.parameters(recurse=False)):
        _materialize_with_seed(model, device, seed, new, left)  # modules put on the meta device some other way
